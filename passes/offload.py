"""Models larger than the device: weights stay in CPU memory, each module is onloaded only while it runs.

The engine is accelerate's `cpu_offload`: an `AlignDevicesHook` on every module that holds parameters moves
them to the execution device just before its forward and back to `meta` right after (the values live in a
CPU state dict that shares storage with the model's own tensors).  A backward pass would still keep every
onloaded weight alive through autograd's saved tensors, so inside the context saved tensors go to the CPU as
well (`torch.autograd.graph.save_on_cpu`) and come back one module at a time during the backward.

    with offloaded(model, "cuda"):
        factors = collect_kfac(model, windows, device="cuda", store=FactorStore())

On exit the hooks are removed and every module gets its original Parameter objects back (same storage, ties
and `requires_grad` flags), so a later shot reads and writes the real weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def offloaded(model: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """Run `model` (parameters on the CPU) on `device` one module at a time inside the context."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("offloaded() needs a model whose parameters are on the CPU")
    own = [(m, name, p) for m in model.modules() for name, p in m._parameters.items() if p is not None]
    cpu_offload(model, execution_device=torch.device(device))
    try:
        with torch.autograd.graph.save_on_cpu(pin_memory=False):
            yield model
    finally:
        remove_hook_from_module(model, recurse=True)
        for m, name, p in own:  # the original Parameter objects: ties, flags and identity as before
            m._parameters[name] = p
