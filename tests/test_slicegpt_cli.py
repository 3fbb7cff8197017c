"""SliceGPT from the command line (`--method slicegpt`, registered in surgeon_fx.methods): the residual stream
is sliced to round(target × d), the result reloads (a tied head keeps its norm tail), bad structures are refused."""
import json
from pathlib import Path

import pytest
import torch

from surgeon_fx import load
from surgeon_fx.cli import main
from surgeon_fx.compile import compile_model, outputs
from surgeon_fx.modelfile import load_model_file
from surgeon_fx.recipe import Recipe

MODELS = Path(__file__).resolve().parents[1] / "models"
SMALL = dict(method="slicegpt", target=0.75, calib_windows=4, calib_length=64, eval_windows=2)


@pytest.mark.parametrize("name,tails", [("tiny_llama.py", ["model.norm"]), ("tiny_qwen2.py", [])])
def test_slicegpt_compiles_and_reloads(name, tails, tmp_path):
    mf = load_model_file(MODELS / name)
    result = compile_model(mf, Recipe(**SMALL), tmp_path / "o", progress=False)
    d = mf.build().config.hidden_size
    assert result.model.get_input_embeddings().weight.shape[1] == round(0.75 * d)
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["tails"] == tails and manifest["plan"]["config"]["hidden_size"] == round(0.75 * d)
    ids = mf.example_inputs(result.model)
    torch.testing.assert_close(outputs(load(result.out), ids), outputs(result.model, ids), rtol=1e-5, atol=1e-5)
    ev = result.report["evaluation"]
    assert ev["after"] < 2 * ev["before"]  # random weights: about the vocabulary size before and after


def test_cli_runs_slicegpt_and_refuses_unstructured(tmp_path, capsys):
    argv = [str(MODELS / "tiny_llama.py"), "--method", "slicegpt", "--target", "0.75", "--calib-windows", "2",
            "--calib-length", "32", "--eval-windows", "1", "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert "slicegpt, structured, target 0.75" in capsys.readouterr().out
    assert main(argv + ["--structure", "unstructured", "--out", str(tmp_path / "b")]) == 2
    assert "method slicegpt does not support structure unstructured" in capsys.readouterr().err
