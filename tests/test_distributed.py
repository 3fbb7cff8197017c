"""Data-parallel curvature on the CPU with gloo and 2 processes: the same factors and the same pruned model as one
process (up to float summation order)."""
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from surgeon_fx.compile import compile_model
from surgeon_fx.modelfile import load_model_file
from surgeon_fx.passes.curvature import collect_kfac
from surgeon_fx.recipe import Recipe
from tests.test_surgeon import tiny_llama, windows

ROOT = Path(__file__).resolve().parents[1]


def _rank_factors(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        factors = collect_kfac(tiny_llama(), windows(6, 16), batch_size=1)
        if rank == 0:
            torch.save({n: (f.A, f.G, f.tokens) for n, f in factors.items()}, out)
    finally:
        dist.destroy_process_group()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_processes_collect_the_single_process_factors(tmp_path):
    out = tmp_path / "factors.pt"
    mp.spawn(_rank_factors, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2)
    single = collect_kfac(tiny_llama(), windows(6, 16), batch_size=1)
    two = torch.load(out, weights_only=True)
    assert set(two) == set(single)
    for name, f in single.items():
        A, G, tokens = two[name]
        assert tokens == f.tokens == 6 * 16
        assert relative(A, f.A) <= 1e-6 and relative(G, f.G) <= 1e-6, name


def test_nproc_2_writes_the_single_process_model(tmp_path):
    opts = ["--shots", "1", "--calib-windows", "4", "--calib-length", "32", "--eval-windows", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "surgeon_fx.cli", "models/tiny_llama.py", *opts, "--nproc", "2",
                          "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("surgeon-compile: wrote") == 1  # rank 0 alone reports and writes
    recipe = Recipe(shots=1, calib_windows=4, calib_length=32, eval_windows=1)
    compile_model(load_model_file(ROOT / "models/tiny_llama.py"), recipe, tmp_path / "one", progress=False)
    one, two = load_file(tmp_path / "one/model.safetensors"), load_file(tmp_path / "two/model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].shape == two[name].shape, name
        assert float((one[name] - two[name]).abs().max()) <= 1e-6, name
