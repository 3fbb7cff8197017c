"""Every emitted artifact loads and reproduces the in-memory pruned model; writing is atomic."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from surgeon_fx.passes.rewrite import shrink
from surgeon_fx import emit, load
from surgeon_fx.compile import compile_model, outputs
from surgeon_fx.graph import build_graph
from surgeon_fx.hf import tiny_llama
from surgeon_fx.modelfile import load_model_file
from surgeon_fx.recipe import Recipe

MODELS = Path(__file__).resolve().parents[1] / "models"
SMALL = dict(calib_windows=4, calib_length=32, shots=1, eval_windows=2)
CASES = {  # id: (model file, recipe)
    "llama-structured": ("tiny_llama.py", Recipe(target=0.7, **SMALL)),
    "gpt2-structured": ("tiny_gpt2.py", Recipe(target=0.7, round_to=4, **SMALL)),
    "qwen2-2of4-wanda": ("tiny_qwen2.py", Recipe(structure="2:4", method="wanda", **SMALL)),
    "llama-unstructured-kobd": ("tiny_llama.py", Recipe(structure="unstructured", method="k-obd", target=0.4,
                                                        **SMALL)),
    "cnn-structured": ("resnet_cnn.py", Recipe(target=0.6, **SMALL)),
    "vit-unstructured-magnitude": ("vit_encoder.py", Recipe(structure="unstructured", method="magnitude",
                                                            target=0.5, **SMALL)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def compiled(request, tmp_path_factory):
    name, recipe = CASES[request.param]
    mf = load_model_file(MODELS / name)
    out = tmp_path_factory.mktemp(request.param) / "out"
    result = compile_model(mf, recipe, out, progress=False)
    return mf, result


def test_load_reproduces_the_pruned_model(compiled):
    mf, result = compiled
    loaded = load(result.out, trust_source=True)
    assert not loaded.training
    inputs = mf.example_inputs(loaded)
    torch.testing.assert_close(outputs(loaded, inputs), outputs(result.model, inputs), rtol=1e-5, atol=1e-5)
    got = dict(loaded.state_dict())
    for name, t in result.model.state_dict().items():
        assert torch.equal(got[name], t), name
    assert result.report["checks"]["reload_max_abs"] <= 1e-5


def test_manifest_describes_the_rebuild(compiled):
    mf, result = compiled
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["format"] == emit.FORMAT
    assert manifest["source"]["sha256"] == mf.sha256
    assert (result.out / manifest["source"]["copy"]).read_bytes() == mf.path.read_bytes()
    if manifest["structure"] == "structured":
        assert manifest["plan"]["shapes"] and not manifest["masks_only"] and manifest["dense_shapes"] is None
        assert result.report["checks"]["pruned_vs_masked_max_abs"] <= 1e-5
    else:
        assert manifest["masks_only"] and manifest["plan"] is None
        params = dict(result.model.named_parameters())
        for name, shape in manifest["dense_shapes"].items():
            assert list(params[name].shape) == shape
            assert (params[name][~result.masks[name]] == 0).all(), name


def test_hf_folder_loads_with_transformers(compiled):
    mf, result = compiled
    manifest = json.loads((result.out / "manifest.json").read_text())
    if "hf_config" not in manifest["source"]:
        assert manifest["hf"] is None and manifest["hf_note"] == "not a Hugging Face model"
        return
    assert manifest["hf"] == "hf" and manifest["hf_note"] is None  # every HF result, uneven widths too
    from transformers import AutoModelForCausalLM

    remote = (result.out / "hf" / "modeling_surgeon.py").exists()  # layers of different widths
    assert remote == ("layer_widths" in json.loads((result.out / "hf" / "config.json").read_text()))
    hf_model = AutoModelForCausalLM.from_pretrained(result.out / "hf", trust_remote_code=remote).eval()
    ids = mf.example_inputs(result.model)[0]
    torch.testing.assert_close(outputs(hf_model, (ids,)), outputs(result.model, (ids,)), rtol=1e-5, atol=1e-5)


def test_loading_from_a_moved_folder_uses_the_copied_source(compiled, tmp_path):
    mf, result = compiled
    moved = tmp_path / "moved"
    shutil.copytree(result.out, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone.py")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    loaded = load(moved, trust_source=True)
    inputs = mf.example_inputs(loaded)
    torch.testing.assert_close(outputs(loaded, inputs), outputs(result.model, inputs), rtol=1e-5, atol=1e-5)


def test_tied_weights_are_saved_once(tmp_path):
    mf = load_model_file(MODELS / "tiny_llama.py")
    recipe = Recipe(structure="unstructured", method="magnitude", target=0.5, eval_windows=1)
    result = compile_model(mf, recipe, tmp_path / "o", progress=False)
    with safe_open(result.out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != ("model.embed_tokens.weight" in keys)
    loaded = load(result.out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_save_hf_writes_uniform_shrinks_and_refuses_uneven_ones(tmp_path):
    model = tiny_llama()
    ids = torch.arange(12)[None]
    graph = build_graph(model, (ids,))
    neurons = [g for g in graph.groups if g.kind == "neurons"]
    shrink(model, graph, {g.name: [0, 5, 7] for g in neurons})
    assert emit.save_hf(model, None, tmp_path / "hf", ids) is None
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.intermediate_size == model.config.intermediate_size == 93
    uneven = tiny_llama()
    graph = build_graph(uneven, (ids,))
    shrink(uneven, graph, {g.name: list(range(i + 1)) for i, g in enumerate(g for g in graph.groups
                                                                             if g.kind == "neurons")})
    reason = emit.save_hf(uneven, None, tmp_path / "hf2", ids)
    assert "layer widths differ" in reason and not (tmp_path / "hf2").exists()


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def broken(folder, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(emit, "write_manifest", broken)
    mf = load_model_file(MODELS / "resnet_cnn.py")
    recipe = Recipe(method="magnitude", target=0.7, shots=2, eval_windows=1)
    with pytest.raises(OSError, match="disk full"):
        compile_model(mf, recipe, tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.work"]  # only the checkpoint, for --resume
    monkeypatch.undo()
    resumed = compile_model(mf, recipe, tmp_path / "o", resume=True, progress=False)
    fresh = compile_model(mf, recipe, tmp_path / "fresh", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "o"]
    assert [s["shot"] for s in resumed.report["shots"]] == [1, 2]
    for (name, a), b in zip(resumed.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_overwrite_replaces_an_earlier_output_atomically(tmp_path):
    out = tmp_path / "o"
    mf = load_model_file(MODELS / "resnet_cnn.py")
    recipe = Recipe(structure="unstructured", method="magnitude", target=0.5)
    compile_model(mf, recipe, out, progress=False)
    (out / "old.txt").write_text("old")
    compile_model(mf, recipe.merged({"target": 0.3}), out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and json.loads((out / "report.json").read_text())["recipe"]["target"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
