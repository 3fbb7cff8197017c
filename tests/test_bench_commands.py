"""The commands the benchmark tables state measure their rows again: parsed by the benchmark's own command line,
each reproduces the setup its runs recorded (calibration, evaluation, shots, corrections, damping, runs)."""
import importlib.util
import json
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parsed(module, command: str):
    words = shlex.split(command)
    assert words[:2] == ["python", f"bench/{module.__name__}.py"]
    return module.parser().parse_args(words[2:])


TABLES = sorted(p for p in RESULTS.glob("prune_matrix_*.json") if (RESULTS / p.stem / "runs").is_dir())


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.stem)
def test_prune_matrix_command_reproduces_recorded_setup(table):
    matrix = bench("prune_matrix")
    runs = json.loads(table.read_text())["runs"]
    args = parsed(matrix, matrix.command_line(RESULTS / table.stem, runs))
    setup = runs[0]
    assert f"{args.calib_windows} x {args.calib_length} tokens" in setup["calibration"]
    windows = int(setup["evaluation"].split(" x ")[0].removeprefix("first "))
    assert args.eval_windows == windows
    assert (args.split == "valid") == ("valid.txt" in setup["evaluation"])
    assert (args.shots, args.sparse_shots) == (setup["shots"]["structured"], setup["shots"]["sparse"])
    lora = setup.get("lora")
    assert (args.lora_rank, lora and args.lora_steps) == ((lora["rank"], lora["steps"]) if lora else (0, None))
    assert args.damp_a == setup.get("damp_a", 0.01)
    assert args.nm_select == setup.get("nm_select", "sequential")
    assert (ROOT / args.out).resolve() == (RESULTS / table.stem).resolve()
    assert sorted(args.only) == sorted(f"{r['method']}/{r['structure']}/{r['target']:g}" for r in runs)


def test_prune_matrix_command_states_a_non_default_damping(tmp_path):
    matrix = bench("prune_matrix")
    run = json.loads(next(iter(TABLES)).read_text())["runs"][0]
    args = parsed(matrix, matrix.command_line(tmp_path, [{**run, "damp_a": 0.1}]))
    assert args.damp_a == 0.1 and (ROOT / args.out).resolve() == tmp_path.resolve()


def test_ablation_flags_reproduce_each_row():
    ablation = bench("surgeon_ablation")
    rows = [json.loads(p.read_text()) for p in sorted(ablation.RESULTS.glob("*.json"))]
    assert rows
    for row in rows:
        args = parsed(ablation, f"python bench/surgeon_ablation.py {ablation.flags_of(row)}")
        assert ablation.record_path(args.only[0], args.target, args.split, args.valid_avoid).name == \
            ablation.record_path(row["name"], row["target"], row.get("split", "test"),
                                 row.get("valid_avoid", ablation.VALID_CALIB)).name
        windows = int(row["evaluation"].split(" x ")[0].removeprefix("first "))
        assert args.eval_windows == windows


def dense_record(folder: Path, windows: int, evaluation: str, calibration: str, **extra) -> Path:
    folder.mkdir(parents=True)
    path = folder / f"dense_{windows}.json"
    path.write_text(json.dumps({"ppl": 20.0, "model": "m", "evaluation": evaluation, "calibration": calibration,
                                **extra}))
    return path


def test_measured_dense_reuses_only_the_same_windows_scored_the_same_way(tmp_path):
    matrix = bench("prune_matrix")
    test4 = "first 4 x 2048-token windows of wikitext-2-raw wiki.test.raw"
    valid4 = "first 4 x 2048-token windows of wikitext-2 valid.txt windows disjoint from the calibration windows"
    c32, c64 = "32 x 512 tokens, wikitext-2 valid.txt, seed 0", "64 x 512 tokens, wikitext-2 valid.txt, seed 0"
    fp32 = dense_record(tmp_path / "a", 4, test4, c32)
    bf16 = dense_record(tmp_path / "b", 4, test4, c32, eval_dtype="bfloat16 autocast")
    valid = dense_record(tmp_path / "c", 4, valid4, c32)
    dense_record(tmp_path / "d", 4, test4, c32, copied_from="a/dense_4.json")  # a copy is never a source
    setup = {"model": "m", "evaluation": test4, "calibration": c64}
    # test windows depend only on their count: another calibration size may reuse them
    assert matrix.measured_dense(setup, False, [tmp_path]) == fp32.resolve()
    assert matrix.measured_dense(setup, True, [tmp_path]) == bf16.resolve()
    assert matrix.measured_dense({**setup, "model": "other"}, False, [tmp_path]) is None
    assert matrix.measured_dense({**setup, "evaluation": test4.replace("4 x", "8 x")}, False, [tmp_path]) is None
    # validation windows avoid the calibration windows: a different calibration means different windows
    assert matrix.measured_dense({**setup, "evaluation": valid4, "calibration": c32}, False, [tmp_path]) == \
        valid.resolve()
    assert matrix.measured_dense({**setup, "evaluation": valid4}, False, [tmp_path]) is None
