"""The promises of docs/reliability.md, one regression test per case of issue 16.

Data loss (1, 2), silently wrong models (3, 4, 5), code execution (6), the smaller items, and the real-model
end-to-end run whose hf/ export used to discard the result (slow).
"""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from surgeon_fx import emit, load
from surgeon_fx.cli import main
from surgeon_fx.compile import ResumeMismatch, compile_model, run_inputs
from surgeon_fx.loader import LoadError
from surgeon_fx.modelfile import load_model_file
from surgeon_fx.recipe import Recipe, RecipeError
from surgeon_fx.report import json_safe, write_report
from tests.test_bad_inputs import MLP, only_line  # MLP: a model file with its own loss() (not an LM)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
LLAMA = str(MODELS / "tiny_llama.py")
QUICK = ["--calib-windows", "2", "--calib-length", "16", "--eval-windows", "1"]
MAGNITUDE = ["--structure", "unstructured", "--method", "magnitude", "--eval-windows", "1"]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def strict_json(path: Path):
    """json.loads that refuses NaN / Infinity (which Python's json writes by default, but JSON does not have)."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds bare {c}"))


def error_line(capsys) -> str:
    return only_line(capsys.readouterr().err)


# -- 1. --overwrite deletes only an earlier output ----------------------------------------------------------
def test_overwrite_refuses_a_folder_of_other_files(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert main([LLAMA, *MAGNITUDE, "--out", str(tmp_path), "--overwrite"]) == 2
    assert "--overwrite refused" in error_line(capsys)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_overwrite_takes_an_empty_folder_or_an_earlier_output(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    assert main([LLAMA, *MAGNITUDE, "--out", str(out), "--overwrite"]) == 0
    assert main([LLAMA, *MAGNITUDE, "--target", "0.3", "--out", str(out), "--overwrite"]) == 0
    assert strict_json(out / "report.json")["recipe"]["target"] == 0.3


# -- 2. two runs on one output: the second fails, nothing of the first is lost ------------------------------
def test_a_run_on_a_locked_output_fails_at_once(tmp_path, capsys):
    out = tmp_path / "o"
    with emit.output_lock(out.absolute()):  # another run holds the output
        assert main([LLAMA, *MAGNITUDE, "--out", str(out)]) == 2
        assert "is being written by another surgeon-compile run" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock goes with its holder


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path, monkeypatch, capsys):
    """The check is repeated at the end and the final rename never replaces (here: an empty folder, which a
    plain rename would silently replace)."""
    out = tmp_path / "o"
    real = emit.write_manifest

    def meanwhile(folder, manifest):
        out.mkdir()  # someone else's result lands while this run works
        return real(folder, manifest)

    monkeypatch.setattr(emit, "write_manifest", meanwhile)
    assert main([LLAMA, *MAGNITUDE, "--out", str(out)]) == 2
    assert "already exists" in error_line(capsys)
    assert out.is_dir() and not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "o.work"]  # the checkpoint stays for --resume


def test_two_processes_on_one_output(tmp_path):
    """Real concurrency: both start together; exactly one writes, the other exits 2 with one line."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "surgeon_fx.cli", LLAMA, *MAGNITUDE, "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=600), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in results] == [0, 2], results
    assert "is being written by another surgeon-compile run" in only_line(results[1][1])
    assert strict_json(out / "manifest.json")["format"] == emit.FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_stale_temporary_folders_are_removed(tmp_path):
    out = tmp_path / "o"
    for stale in (".o.tmp-deadbeef", ".o.tmp-old-cafecafe"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.tmp-12345678").mkdir()  # another output's: not ours to remove
    assert main([LLAMA, *MAGNITUDE, "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-12345678", "o"]


# -- 3. --resume refuses a checkpoint made from other inputs --------------------------------------------------
@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A run of the MLP stopped after its last shot (the write failed): o.work holds a checkpoint."""
    path = write(tmp_path / "mlp.py", MLP.replace("manual_seed(seed)", "manual_seed(seed + SHIFT)") +
                 "\nimport os\nSHIFT = int(os.environ.get('SURGEON_SHIFT', '0'))\n")
    args = [str(path), "--target", "0.6", "--shots", "2", "--calib-windows", "3", "--out", str(tmp_path / "o")]

    def broken(folder, manifest):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(emit, "write_manifest", broken)
        with pytest.raises(OSError):
            main([*args, "--traceback"])
    assert (tmp_path / "o.work" / "checkpoint").is_dir()
    return tmp_path, path, args


@pytest.mark.parametrize("change, reason", [
    (["--calib-windows", "4"], "other options (calib_windows was 3, now 4)"),
    (["--seed", "1"], "other options (seed was 0, now 1)"),
    (["--fisher", "sampled"], "other options (fisher was 'empirical', now 'sampled')"),
    (["--target", "0.5"], "other options (target was 0.6, now 0.5)"),
])
def test_resume_refuses_other_options_or_data(interrupted, capsys, change, reason):
    tmp_path, _, args = interrupted
    capsys.readouterr()
    assert main([*args, *change, "--resume"]) == 2
    line = error_line(capsys)
    assert f"--resume: the checkpoint in {tmp_path / 'o.work'} was made from {reason}" in line, line
    assert (tmp_path / "o.work" / "checkpoint").is_dir() and not (tmp_path / "o").exists()


def test_resume_refuses_other_calibration_data(interrupted, capsys, monkeypatch):
    tmp_path, _, args = interrupted
    monkeypatch.setenv("SURGEON_SHIFT", "1")  # the same file and options draw other batches
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "was made from other calibration data" in error_line(capsys)


def test_resume_refuses_another_model_file(interrupted, capsys):
    tmp_path, path, args = interrupted
    path.write_text(MLP + "\n# edited\n")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "was made from another model file" in error_line(capsys)


def test_resume_with_the_same_inputs_continues(interrupted, capsys):
    tmp_path, _, args = interrupted
    assert main([*args, "--resume"]) == 0
    assert [s["shot"] for s in strict_json(tmp_path / "o" / "report.json")["shots"]] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.py", "o"]


def test_resume_mismatch_is_a_typed_error(interrupted):
    """The Python API raises ResumeMismatch (no message matching needed), also for other weights."""
    tmp_path, path, _ = interrupted
    mf = load_model_file(path)
    recipe = Recipe(target=0.6, shots=2, calib_windows=3)
    model = mf.build()
    calib = mf.calibration(3, recipe.calib_length, 0)
    same = run_inputs(mf, recipe, model, calib)
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    assert run_inputs(mf, recipe, model, calib)["weights"] != same["weights"]
    with pytest.raises(ResumeMismatch, match="other options"):
        compile_model(mf, recipe.merged({"shots": 3}), tmp_path / "o", resume=True, progress=False)


# -- 4. non-finite weights or outputs: exit 2 naming the parameter; JSON stays valid -------------------------
def test_nan_after_pruning_is_named(tmp_path, monkeypatch, capsys):
    import surgeon_fx.compile as compile_module

    real = compile_module.run_pruning

    def poisoned(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        return result

    monkeypatch.setattr(compile_module, "run_pruning", poisoned)
    assert main([LLAMA, *MAGNITUDE, "--out", str(tmp_path / "o")]) == 2
    assert "the pruned model has non-finite weights: model.layers.1.mlp.down_proj.weight holds NaN" in \
        error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.work"]  # the shots' checkpoint, nothing else


def test_report_json_stays_valid_with_an_infinite_perplexity(tmp_path):
    assert json_safe({"a": [math.inf, -math.inf, math.nan, 1.5], "b": "x"}) == {"a": ["inf", "-inf", "nan", 1.5],
                                                                                "b": "x"}
    mf = load_model_file(LLAMA)
    result = compile_model(mf, Recipe(structure="unstructured", method="magnitude", eval_windows=1), tmp_path / "o",
                           progress=False)
    strict_json(tmp_path / "o" / "report.json")
    result.report["evaluation"]["after"] = math.inf
    again = tmp_path / "again"
    again.mkdir()
    write_report(again, result.report, {})
    assert strict_json(tmp_path / "again" / "report.json")["evaluation"]["after"] == "inf"


# -- 5. the weights' sha256 is recorded and verified ----------------------------------------------------------
def test_flipped_bytes_do_not_load(tmp_path):
    out = tmp_path / "o"
    compile_model(load_model_file(LLAMA), Recipe(structure="unstructured", method="magnitude", eval_windows=1), out,
                  progress=False)
    data = bytearray((out / "model.safetensors").read_bytes())
    assert strict_json(out / "manifest.json")["weights_sha256"] == hashlib.sha256(data).hexdigest()
    data[-5] ^= 0x10  # a bit of the last tensor: the file still parses
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LoadError, match="does not match the sha256"):
        load(out)


# -- 6. loading runs no code from the folder unless trusted ------------------------------------------------
MARKED = """
import os
from pathlib import Path
Path(os.environ["SURGEON_MARK"]).write_text("ran")
"""


def test_load_runs_no_model_file_without_trust(tmp_path, monkeypatch):
    mark = tmp_path / "mark"
    monkeypatch.setenv("SURGEON_MARK", str(mark))
    path = write(tmp_path / "mlp.py", MARKED + MLP)
    out = tmp_path / "o"
    compile_model(load_model_file(path), Recipe(structure="unstructured", method="magnitude"), out, progress=False)
    mark.unlink()
    with pytest.raises(LoadError, match="trust_source=True"):
        load(out)
    assert not mark.exists()
    assert load(out, trust_source=True)[0].weight.shape == (16, 8) and mark.exists()


@pytest.mark.parametrize("copy", ["../evil.py", "/tmp/evil-surgeon.py", "source/../../evil.py"])
def test_manifest_paths_stay_inside_the_folder(tmp_path, monkeypatch, copy):
    mark = tmp_path / "mark"
    monkeypatch.setenv("SURGEON_MARK", str(mark))
    path = write(tmp_path / "mlp.py", MLP)
    out = tmp_path / "sub" / "o"
    compile_model(load_model_file(path), Recipe(structure="unstructured", method="magnitude"), out, progress=False)
    evil = (out / copy).resolve() if not copy.startswith("/") else Path(copy)
    evil.write_text(MARKED + MLP)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"].update(path=str(tmp_path / "gone.py"), copy=copy)
    (out / "manifest.json").write_text(json.dumps(manifest))
    try:
        with pytest.raises(LoadError, match="outside the folder"):
            load(out, trust_source=True)
    finally:
        evil.unlink()
    assert not mark.exists()


def test_a_changed_source_copy_is_not_run(tmp_path, monkeypatch):
    mark = tmp_path / "mark"
    monkeypatch.setenv("SURGEON_MARK", str(mark))
    path = write(tmp_path / "mlp.py", MLP)
    out = tmp_path / "o"
    compile_model(load_model_file(path), Recipe(structure="unstructured", method="magnitude"), out, progress=False)
    path.unlink()
    (out / "source" / "mlp.py").write_text(MARKED + MLP)
    with pytest.raises(LoadError, match="matches the sha256"):
        load(out, trust_source=True)
    assert not mark.exists()


def test_hugging_face_results_load_from_config_alone(tmp_path, monkeypatch):
    mark = tmp_path / "mark"
    monkeypatch.setenv("SURGEON_MARK", str(mark))
    path = write(tmp_path / "llama.py", MARKED + "from surgeon_fx.hf import tiny_llama\n\ndef build():\n"
                                                "    return tiny_llama()\n")
    out = tmp_path / "o"
    compile_model(load_model_file(path), Recipe(structure="unstructured", method="magnitude"), out, progress=False)
    mark.unlink()
    assert load(out).config.hidden_size == 64
    assert not mark.exists()


def test_bench_cache_is_loaded_without_running_code(tmp_path, monkeypatch):
    """bench/prune_matrix.py reads its KFAC cache with weights_only=True: a pickle that runs code is refused
    (and recomputed); its own cache round-trips."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prune_matrix", ROOT / "bench" / "prune_matrix.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mark = tmp_path / "mark"
    cache = tmp_path / "cache.pt"
    torch.save({"x": Evil(str(mark))}, cache)
    from surgeon_fx.graph import build_graph
    from surgeon_fx.hf import tiny_llama

    model = tiny_llama()
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    factors = bench.dense_factors(model, calib, build_graph(model, (calib[:1],)), cache)
    assert not mark.exists() and factors
    again = bench.dense_factors(model, calib, None, cache)  # from the rewritten cache: no graph needed
    for name, f in factors.items():
        assert torch.equal(again[name].A, f.A) and again[name].tokens == f.tokens


class Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("ran",))


# -- smaller items ---------------------------------------------------------------------------------------
def test_root_module_layer_prunes_unstructured(tmp_path, capsys):
    """A model that is one nn.Linear used to fail with KeyError: '.weight'."""
    path = write(tmp_path / "lin.py", MLP.replace("nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))",
                                                  "nn.Linear(8, 3)"))
    assert main([str(path), "--structure", "unstructured", "--target", "0.5", "--out", str(tmp_path / "o")]) == 0
    loaded = load(tmp_path / "o", trust_source=True)
    assert int((loaded.weight == 0).sum()) == 12


def test_same_seed_gives_byte_identical_weights(tmp_path):
    """Tied weights (tiny Llama): the safetensors header used to list its metadata in a per-run order."""
    mf = load_model_file(LLAMA)
    recipe = Recipe(structure="unstructured", target=0.6, shots=2, calib_windows=2, calib_length=16, eval_windows=1)
    digests = {hashlib.sha256((compile_model(mf, recipe, tmp_path / f"o{i}", progress=False).out
                               / "model.safetensors").read_bytes()).hexdigest() for i in range(2)}
    model = mf.build()
    for i in range(6):  # the header order was a coin flip per save
        emit.save_weights(model, tmp_path / f"o{i % 2}")
        digests.add(hashlib.sha256((tmp_path / f"o{i % 2}" / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 2  # the pruned file and the dense one: each always the same bytes


def test_report_names_the_source_copy(tmp_path):
    out = tmp_path / "o"
    result = compile_model(load_model_file(write(tmp_path / "mlp.py", MLP)),
                           Recipe(structure="unstructured", method="magnitude"), out, progress=False)
    assert str(out / "source" / "mlp.py") in result.report["output"]
    assert all(Path(p).exists() for p in result.report["output"])


@pytest.mark.parametrize("values, message", [
    ({"target": "0.5"}, "target must be float, got '0.5'"),
    ({"shots": 2.5}, "shots must be int, got 2.5"),
    ({"damp_a": math.nan}, "damp_a must be a finite number"),
    ({"structure": 2}, "structure must be a string"),
    ({"eval_windows": True}, "eval_windows must be int"),
])
def test_recipe_checks_types_in_the_python_api(values, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe(**values)


def test_recipe_accepts_an_int_where_a_float_is_wanted():
    assert Recipe(target=1, damp_g=2).damp_g == 2.0 and isinstance(Recipe(target=1).target, float)


SLEEPY = MLP.replace("def build():", """def build():
    import os, time
    from pathlib import Path
    ready = Path(os.environ["SURGEON_READY"])
    if ready.with_suffix(".built").exists():  # the second build: the reload check, inside the temporary folder
        ready.write_text("x")
        time.sleep(120)
    ready.with_suffix(".built").write_text("x")""")


def test_sigterm_leaves_no_temporary_folder(tmp_path):
    """SIGTERM while the output is being written: one line, exit 143, no .o.tmp-*, no lock, no output."""
    path = write(tmp_path / "sleepy.py", SLEEPY)
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "SURGEON_READY": str(tmp_path / "ready")}
    proc = subprocess.Popen([sys.executable, "-m", "surgeon_fx.cli", str(path), *MAGNITUDE, "--out",
                             str(run / "o")], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "ready").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert [p.name for p in run.iterdir() if p.name.startswith(".o.tmp-")], "not inside the write"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert only_line(proc.stderr.read()) == \
        "surgeon-compile: terminated; rerun with --resume to continue from the last finished shot"
    assert [p.name for p in run.iterdir()] == ["o.work"]  # only the checkpoint that --resume continues from


def test_ctrl_c_during_start_up_prints_no_traceback(tmp_path):
    """SIGINT while torch is being imported (or later, in build()): one line at most, never a traceback."""
    path = write(tmp_path / "slow.py", MLP.replace("def build():", "def build():\n    import time\n    time.sleep(60)"))
    for delay in (0.3, 1.0):
        proc = subprocess.Popen([sys.executable, "-m", "surgeon_fx.cli", str(path), "--out", str(tmp_path / "o")],
                                cwd=ROOT, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)  # importing torch takes seconds
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        assert rc == -signal.SIGINT or (rc == 130 and only_line(err).endswith("interrupted; rerun with --resume "
                                                                              "to continue from the last finished "
                                                                              "shot")), (rc, err)
    assert not (tmp_path / "o").exists()


# -- the main job must not lose its result to the optional hf/ export --------------------------------------
def test_a_failing_hf_export_does_not_cost_the_result(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def refuse(self, *args, **kwargs):
        raise ValueError("The model is quantized with gguf and is not serializable")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", refuse)
    out = tmp_path / "o"
    compile_model(load_model_file(LLAMA), Recipe(structure="unstructured", method="magnitude", eval_windows=1), out,
                  progress=False)
    manifest = strict_json(out / "manifest.json")
    assert manifest["hf"] is None and "not serializable" in manifest["hf_note"]
    assert load(out).lm_head.weight.shape == (128, 64)


@pytest.mark.slow
def test_smollm2_unstructured_end_to_end(tmp_path, capsys):
    """The built-in SmolLM2 (GGUF) unstructured: the result and its hf/ folder are written and load."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    assert main([str(MODELS / "smollm2.py"), "--structure", "unstructured", "--method", "wanda", "--target", "0.5",
                 "--calib-windows", "2", "--calib-length", "64", "--eval-windows", "1", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    manifest = strict_json(out / "manifest.json")
    assert manifest["hf"] == "hf" and "quantization_config" not in manifest["source"]["hf_config"]
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    loaded = load(out)
    ids = torch.arange(32)[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-4)
    assert "quantization_config" not in json.loads((out / "hf" / "config.json").read_text())
