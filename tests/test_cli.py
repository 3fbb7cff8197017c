"""surgeon-compile from the command line: help, a full run, recipes, and every bad input ending in one line."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from surgeon_fx.cli import main
from surgeon_fx.methods import surgeon_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FAST = ["--calib-windows", "4", "--calib-length", "32", "--shots", "1", "--eval-windows", "2"]

LOSS_MODEL = """
import torch
from torch import nn
import torch.nn.functional as F

def example_inputs():
    return (torch.randn(2, IN),)

def calibration(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, IN, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]

def loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")
"""


def model_file(tmp_path, build, inputs=8):
    path = tmp_path / "model.py"
    source = textwrap.dedent(LOSS_MODEL) + textwrap.dedent(build)
    path.write_text(source.replace("IN", str(inputs)))
    return path


MLP = """
def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Linear(16, 3))
"""


def run_error(capsys, argv, out):
    """Run the CLI expecting a bad-input exit; returns the stderr line; checks nothing was written."""
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("surgeon-compile: error: ")
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name.endswith(".work")]
    return err[-1]


def test_help_reads_like_documentation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # independent of the terminal width
    for needle in ("fraction of the PRUNABLE parameters kept", "examples:", "models/smollm2.py", "--resume",
                   "--round-to", "--lora-rank", "surgeon_fx.load", "build() -> nn.Module", "sparsegpt"):
        assert needle in text, needle


def test_console_entry_point_runs_a_tiny_model(tmp_path):
    out = tmp_path / "llama"
    proc = subprocess.run([sys.executable, "-m", "surgeon_fx.cli", str(MODELS / "tiny_llama.py"), *FAST,
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "perplexity" in proc.stdout
    assert "\r" not in proc.stderr  # progress bars stay quiet when stderr is not a terminal
    for name in ("model.safetensors", "manifest.json", "report.md", "report.json", "kept_by_depth.png",
                 "kept_by_kind.png", "source/tiny_llama.py"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "llama.work").exists()


def test_recipe_file_and_option_override(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('structure = "unstructured"\ntarget = 0.5\nmethod = "magnitude"\nshots = 2\n'
                      'calib-windows = 4\n')
    out = tmp_path / "o"
    assert main([str(MODELS / "tiny_gpt2.py"), "--recipe", str(recipe), "--target", "0.3", "--eval-windows", "1",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["recipe"]["structure"] == "unstructured" and rep["recipe"]["method"] == "magnitude"
    assert rep["recipe"]["target"] == 0.3 and rep["recipe"]["shots"] == 2 and rep["recipe"]["calib_windows"] == 4
    assert abs(rep["parameters"]["prunable_after"] / rep["parameters"]["prunable_before"] - 0.3) < 1e-3
    assert "hf/" in capsys.readouterr().out  # masks only: the model's own config still fits


def test_existing_output_is_kept(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main([str(MODELS / "tiny_llama.py"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_missing_build(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text("import torch\n")
    line = run_error(capsys, [str(path)], tmp_path / "o")
    assert line == "surgeon-compile: error: model.py does not define build()"


def test_untraceable_model_names_the_cause(tmp_path, capsys):
    build = """
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(IN, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: neither tracer can follow it
            h = h * 2
        return self.b(h)

def build():
    return Branchy()
"""
    line = run_error(capsys, [str(model_file(tmp_path, build))], tmp_path / "o")
    assert "cannot trace Branchy" in line and "control flow" in line


@pytest.mark.parametrize("target", ["0", "1", "1.5", "-0.2"])
def test_target_out_of_range(tmp_path, capsys, target):
    line = run_error(capsys, [str(model_file(tmp_path, MLP)), "--target", target], tmp_path / "o")
    assert "target must be between 0 and 1 (the fraction of prunable parameters kept)" in line


def test_target_below_what_min_keep_allows(tmp_path, capsys):
    line = run_error(capsys, [str(model_file(tmp_path, MLP)), "--target", "0.01"], tmp_path / "o")
    assert "target 0.01 cannot be met: structured pruning keeps at least" in line


def test_structured_without_groups(tmp_path, capsys):
    build = "\ndef build():\n    return nn.Linear(IN, 3)\n"
    line = run_error(capsys, [str(model_file(tmp_path, build))], tmp_path / "o")
    assert "no prunable groups" in line


def test_nm_width_not_a_multiple(tmp_path, capsys):
    line = run_error(capsys, [str(model_file(tmp_path, MLP, inputs=6)), "--structure", "2:4"], tmp_path / "o")
    assert "structure 2:4 is not possible: layer 0 has 6 inputs, not a multiple of 4" in line


def test_method_needs_a_language_model(tmp_path, capsys):
    line = run_error(capsys, [str(model_file(tmp_path, MLP)), "--structure", "unstructured", "--method", "wanda"],
                     tmp_path / "o")
    assert "method wanda needs a causal language model" in line


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_structured_peer_writes_a_smaller_model_that_reloads(tmp_path, capsys, method):
    out = tmp_path / method
    assert main([str(MODELS / "tiny_llama.py"), "--method", method, "--structure", "structured", "--target", "0.7",
                 *FAST, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["recipe"]["method"] == method
    kept = rep["parameters"]["prunable_after"] / rep["parameters"]["prunable_before"]
    assert 0.6 < kept <= 0.7 + 1e-3 and rep["parameters"]["after"] < rep["parameters"]["before"]
    assert rep["checks"]["pruned_vs_masked_max_abs"] < 1e-5 and rep["checks"]["reload_max_abs"] < 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    biases = [n for n in manifest["plan"]["added"] if n.endswith("down_proj.bias")]
    assert bool(biases) == (method == "flap")  # FLAP's compensation biases travel with the plan
    import surgeon_fx
    model = surgeon_fx.load(out)
    assert sum(p.numel() for p in model.parameters()) == rep["parameters"]["after"]


def test_structured_peer_refuses_unstructured(tmp_path, capsys):
    line = run_error(capsys, [str(MODELS / "tiny_llama.py"), "--method", "flap", "--structure", "unstructured"],
                     tmp_path / "o")
    assert "method flap does not support structure unstructured" in line


def test_structured_sparsegpt_is_refused(tmp_path, capsys):
    line = run_error(capsys, [str(MODELS / "tiny_llama.py"), "--method", "sparsegpt"], tmp_path / "o")
    assert "method sparsegpt does not support structure structured" in line


def test_missing_calibration(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text("from surgeon_fx.hf import tiny_llama\n\ndef build():\n    return tiny_llama()\n")
    line = run_error(capsys, [str(path)], tmp_path / "o")
    assert "no calibration data" in line


def test_calibration_file_too_short(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("only a few bytes")
    line = run_error(capsys, [str(MODELS / "tiny_llama.py"), "--calib-file", str(text), "--calib-length", "64"],
                     tmp_path / "o")
    assert "calibration data too short" in line and "16 tokens, fewer than one window of 64" in line


def test_calibration_longer_than_the_model_positions(tmp_path, capsys):
    line = run_error(capsys, [str(MODELS / "tiny_opt.py"), "--calib-length", "1024"], tmp_path / "o")
    assert "calibration length 1024 exceeds the model's 256 positions" in line


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_missing_device(tmp_path, capsys):
    line = run_error(capsys, [str(MODELS / "tiny_llama.py"), "--device", "cuda:7"], tmp_path / "o")
    assert "device cuda:7 is not available" in line


def test_bad_device_name(tmp_path, capsys):
    line = run_error(capsys, [str(MODELS / "tiny_llama.py"), "--device", "gpu0"], tmp_path / "o")
    assert "device 'gpu0' is not a device name" in line


def test_recipe_unknown_key(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("targt = 0.5\n")
    line = run_error(capsys, [str(MODELS / "tiny_llama.py"), "--recipe", str(recipe)], tmp_path / "o")
    assert "unknown key 'targt'" in line


def test_model_and_hf_are_exclusive(tmp_path, capsys):
    line = run_error(capsys, [str(MODELS / "tiny_llama.py"), "--hf", str(tmp_path)], tmp_path / "o")
    assert "exactly one" in line


def test_bad_update_in_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('update = "both"\n')
    line = run_error(capsys, [str(MODELS / "tiny_llama.py"), "--recipe", str(recipe)], tmp_path / "o")
    assert "update must be one of correlated, consumer, none, not 'both'" in line


def test_update_option_reaches_the_driver():
    from surgeon_fx.recipe import Recipe
    assert surgeon_config(Recipe(), "kfac").update == "consumer"
    assert surgeon_config(Recipe().merged({"update": "correlated"}), "kfac").update == "correlated"
