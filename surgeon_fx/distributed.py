"""Many processes: `surgeon-compile --nproc N` starts N copies of itself under torchrun; each joins the default
process group and collects curvature on its share of the calibration windows (`passes.curvature.collect_kfac`
all-reduces the sums), then every rank makes the same selection and updates, and rank 0 alone evaluates and
writes the output.

Backends: NCCL when the device is CUDA (rank r uses cuda:LOCAL_RANK), gloo on the CPU.  torchrun sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; this module only reads them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started by torchrun as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """Rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def join(device: str) -> str:
    """Join the process group torchrun describes (NCCL for a CUDA `device`, else gloo) and return this rank's
    device name: cuda:LOCAL_RANK for a CUDA device, `device` otherwise.  No-op outside torchrun."""
    if not launched() or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def leave() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still needs it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `python -m surgeon_fx.cli ARGV` in `nproc` processes under torchrun; returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "surgeon_fx.cli", *argv]
    return subprocess.call(cmd)
