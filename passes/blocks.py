"""Matrix view of a layer's parameters and the row/column blocks a structured unit occupies in it.

Every curvature-carrying layer is seen as one matrix M (out, in'), the orientation of its KFAC factors:

* ``nn.Linear``: M = [W b], W = weight (out, in);
* HF ``Conv1D`` (weight stored (in, out)): M = [weightᵀ b];
* ``nn.Conv2d`` (groups 1): M = [weight.reshape(out, c·kh·kw) b]; input channel c owns columns
  c·kh·kw … (c+1)·kh·kw − 1 (the order of ``F.unfold``).

The bias, when present, is the last column (in' = in + 1): removing a row removes its bias entry, removing a
column never touches the bias, and updates change [W b] as one matrix.

A `Slice(param, dim, index)` of such a layer maps to rows or columns of M:
Linear weight dim 0 → rows, dim 1 → columns; Conv1D weight dim 0 → columns, dim 1 → rows; Conv2d weight dim 0 →
rows, dim 1 → the kh·kw columns of each channel; bias dim 0 → rows.  Slices of any other parameter (norm
weights, embeddings, layers without factors) are *free*: they add no cost and are only zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from surgeon_fx.groups import Slice, Unit
from surgeon_fx.layers import CONV1D, LINEAR, matrix_kind


def to_matrix(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """M (out, in') from a weight-shaped and an optional bias-shaped tensor (values or masks alike)."""
    weight = matrix_kind(module).out_in(weight)
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)


def from_matrix(module: nn.Module, M: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of `to_matrix` for this module: (weight in storage shape, bias or None)."""
    has_bias = module.bias is not None
    W, b = (M[:, :-1], M[:, -1]) if has_bias else (M, None)
    return matrix_kind(module).storage(W, module.weight.shape), (None if b is None else b.contiguous())


def read_matrix(module: nn.Module, dtype: torch.dtype = torch.float64) -> Tensor:
    """The layer's current M = [W b] (out, in') as a new tensor of `dtype`."""
    return to_matrix(module, module.weight.detach(), None if module.bias is None else module.bias.detach()).to(dtype)


@torch.no_grad()
def write_matrix(module: nn.Module, M: Tensor) -> None:
    """Copy M (out, in') back into the layer's weight (and bias), in their dtype."""
    W, b = from_matrix(module, M)
    module.weight.copy_(W)
    if b is not None:
        module.bias.copy_(b)


def slice_block(module: nn.Module, attr: str, dim: int, index: Tensor) -> tuple[str, Tensor]:
    """("rows" | "cols", indices into M) for a slice of `module.<attr>` along `dim`."""
    if attr == "bias":
        return "rows", index
    kind = matrix_kind(module)
    if kind is LINEAR:
        return ("rows", index) if dim == 0 else ("cols", index)
    if kind is CONV1D:
        return ("cols", index) if dim == 0 else ("rows", index)
    if dim == 0:
        return "rows", index
    if dim == 1:
        k = module.weight.shape[2] * module.weight.shape[3]
        return "cols", (index[:, None] * k + torch.arange(k)).reshape(-1)
    raise ValueError(f"conv2d slice along dim {dim} has no row/column block")


@dataclass(frozen=True)
class UnitBlocks:
    """What one unit removes: rows/cols of M per curved layer (sorted, unique) and its free slices."""

    rows: dict[str, Tensor]
    cols: dict[str, Tensor]
    free: tuple[Slice, ...]


def unit_blocks(unit: Unit, modules: dict[str, nn.Module], curved: set[str]) -> UnitBlocks:
    """Map a unit's slices to row/column blocks of the layers named in `curved` (others become free slices)."""
    acc: dict[str, dict[str, list[Tensor]]] = {"rows": {}, "cols": {}}
    free = []
    for s in unit.slices:
        owner, _, attr = s.param.rpartition(".")
        if owner in curved and attr in ("weight", "bias"):
            side, idx = slice_block(modules[owner], attr, s.dim, s.index)
            acc[side].setdefault(owner, []).append(idx)
        else:
            free.append(s)
    merge = {side: {name: parts[0] if len(parts) == 1 else torch.unique(torch.cat(parts))  # one slice: sorted
                    for name, parts in d.items()} for side, d in acc.items()}
    return UnitBlocks(rows=merge["rows"], cols=merge["cols"], free=tuple(free))
