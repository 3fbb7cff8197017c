"""Low-rank first-order corrections between shots (the paper's optional LoRA step), with masks respected.

For each pruned layer with matrix view W (out, in) and keep-mask K (1 = weight kept), an adapter
ΔW = K ⊙ (B A)·(α/r), B [out, r] zero-initialised, A [r, in] ~ N(0, 1/in), is added to the layer's output
(y += x ΔWᵀ) through a forward hook.  Only the adapters train (Adam, LM loss on the calibration windows); the
model's own parameters are frozen.  Because the mask is applied inside the forward pass, what is trained is
exactly what is absorbed: W ← W + K ⊙ (B A)·(α/r), so pruned weights stay exactly zero.  The hooks are removed
afterwards, leaving the model's structure unchanged.  Supported: nn.Linear and HF Conv1D (bias untouched).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon_fx.layers import CONV2D, matrix_kind
from surgeon_fx.passes.blocks import to_matrix
from surgeon_fx.groups import param_name


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a causal LM on token ids `batch` [B, L] (logits or `.logits` output)."""
    out = model(batch)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def _weight_mask(module: nn.Module, mask: Tensor | None) -> Tensor:
    """Keep-mask in (out, in) orientation (all ones when None)."""
    if mask is None:
        return torch.ones_like(to_matrix(module, module.weight.detach(), None), dtype=torch.bool)
    return to_matrix(module, mask, None)


def lora_correct(model: nn.Module, windows: Tensor, layers: list[str], masks: dict[str, Tensor], rank: int,
                 steps: int, lr: float = 1e-3, alpha: float | None = None, seed: int = 0, batch_size: int = 1,
                 loss_fn: Callable[[nn.Module, Tensor], Tensor] = lm_loss) -> list[float]:
    """Train rank-`rank` masked adapters on `layers` for `steps` Adam steps, absorb them, remove them.

    masks: param name ("<layer>.weight") → bool keep-mask in the parameter's storage shape (missing = all kept).
    Batches of `batch_size` windows are drawn by a generator seeded with `seed`.  Returns the loss at each step.
    """
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    scale = (alpha if alpha is not None else rank) / rank
    adapters, hooks = {}, []
    for name in layers:
        m = modules[name]
        if matrix_kind(m) is CONV2D:
            raise ValueError(f"LoRA corrections support Linear and Conv1D layers, not {name!r} (Conv2d)")
        keep = _weight_mask(m, masks.get(param_name(name))).to(m.weight.dtype)
        out_dim, in_dim = keep.shape
        A = nn.Parameter(torch.randn(rank, in_dim, generator=gen, dtype=m.weight.dtype) / in_dim ** 0.5)
        B = nn.Parameter(torch.zeros(out_dim, rank, dtype=m.weight.dtype))
        adapters[name] = (A, B, keep)
        hooks.append(m.register_forward_hook(_hook(A, B, keep, scale)))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([t for a in adapters.values() for t in a[:2]], lr=lr)
    losses = []
    try:
        for _ in range(steps):
            pick = torch.randint(0, windows.shape[0], (batch_size,), generator=gen)
            loss = loss_fn(model, windows[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    with torch.no_grad():
        for name, (A, B, keep) in adapters.items():
            m = modules[name]
            delta = keep * (B @ A) * scale
            m.weight += matrix_kind(m).storage(delta, m.weight.shape)
    return losses


def _hook(A: Tensor, B: Tensor, keep: Tensor, scale: float):
    def add_adapter(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + F.linear(args[0], keep * (B @ A) * scale)
    return add_adapter
