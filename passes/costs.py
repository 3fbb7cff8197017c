"""Closed-form pruning costs under a Kronecker-factored curvature F = G ⊗ A.

Layer matrix W (out, in'), θ = vec(W) row-major, so (G ⊗ A) θ = vec(G W A).  Removing the weights selected by
E (Eθ → 0) with the optimal compensating update of all others costs

    L = ½ (Eθ)ᵀ (E F⁻¹ Eᵀ)⁻¹ (Eθ),        F⁻¹ = G⁻¹ ⊗ A⁻¹.

Specialisations used here (all exact for the given F):

* one element (i, j):        L = W_ij² / (2 [G⁻¹]_ii [A⁻¹]_jj)
* a block R of whole rows:   L = ½ tr((G⁻¹_RR)⁻¹ W_R A W_Rᵀ)       (E F⁻¹ Eᵀ = G⁻¹_RR ⊗ A⁻¹)
* a block C of whole columns: L = ½ tr((A⁻¹_CC)⁻¹ W_Cᵀ G W_C)      (E F⁻¹ Eᵀ = G⁻¹ ⊗ A⁻¹_CC)

`layer_unit_costs` prices the blocks of every structured unit in one layer; `unit_costs` sums them over every layer a
unit touches (each block priced alone).
"""
from __future__ import annotations

import torch
from torch import Tensor

from surgeon_fx.passes.baselines import LayerCurvature
from surgeon_fx.passes.blocks import UnitBlocks


def element_costs(W: Tensor, ginv_diag: Tensor, ainv_diag: Tensor) -> Tensor:
    """[out, in] costs W_ij² / (2 [G⁻¹]_ii [A⁻¹]_jj); W may be the first `in` columns of an (out, in') matrix."""
    return W.square() / (2.0 * ginv_diag[:, None] * ainv_diag[None, : W.shape[1]])


def row_block_costs(W: Tensor, A: Tensor, Ginv: Tensor, blocks: Tensor) -> Tensor:
    """[U] costs ½ tr((G⁻¹_RR)⁻¹ W_R A W_Rᵀ) for row blocks `blocks` [U, k] of W (out, in')."""
    WA = W @ A
    S = WA[blocks] @ W[blocks].transpose(1, 2)  # [U, k, k] = W_R A W_Rᵀ
    C = Ginv[blocks[:, :, None], blocks[:, None, :]]  # [U, k, k] = G⁻¹_RR
    return _half_trace_solve(C, S)


def col_block_costs(W: Tensor, G: Tensor, Ainv: Tensor, blocks: Tensor) -> Tensor:
    """[U] costs ½ tr((A⁻¹_CC)⁻¹ W_Cᵀ G W_C) for column blocks `blocks` [U, k] of W (out, in')."""
    Wt, GWt = W.t(), (G @ W).t()
    S = Wt[blocks] @ GWt[blocks].transpose(1, 2)  # [U, k, k] = W_Cᵀ G W_C
    C = Ainv[blocks[:, :, None], blocks[:, None, :]]  # [U, k, k] = A⁻¹_CC
    return _half_trace_solve(C, S)


def _half_trace_solve(C: Tensor, S: Tensor) -> Tensor:
    """[U] ½ tr(C⁻¹ S) for batches of k × k blocks; a division when k = 1 (single rows or columns)."""
    if C.shape[-1] == 1:
        return 0.5 * (S / C).reshape(-1)
    return 0.5 * torch.linalg.solve(C, S).diagonal(dim1=1, dim2=2).sum(-1)


def layer_unit_costs(units: list[UnitBlocks], name: str, W: Tensor, curv: LayerCurvature) -> Tensor:
    """[U] the part of each unit's cost that lies in layer `name`: its row-block cost plus its column-block cost
    there (0 for units that do not touch the layer).

    W: the layer's (out, in') float64 matrix; curv: its damped curvature.  Units with equal-sized blocks are
    priced in one batched solve.  A unit holding both rows and columns of the layer is priced as the sum of the
    two block costs (their shared entries counted twice).
    """
    total = torch.zeros(len(units), dtype=torch.float64, device=W.device)
    for side in ("rows", "cols"):
        buckets: dict[int, list[tuple[int, Tensor]]] = {}
        for u, blocks in enumerate(units):
            idx = getattr(blocks, side).get(name)
            if idx is not None:
                buckets.setdefault(idx.numel(), []).append((u, idx))
        for items in buckets.values():
            who = torch.tensor([u for u, _ in items], device=W.device)
            blocks = torch.stack([idx for _, idx in items]).to(W.device)
            if side == "rows":
                c = row_block_costs(W, curv.A, curv.G_inv, blocks)
            else:
                c = col_block_costs(W, curv.G, curv.A_inv, blocks)
            total.index_add_(0, who, c.to(torch.float64))
    return total


def unit_costs(units: list[UnitBlocks], layers: dict[str, tuple[Tensor, LayerCurvature]]) -> Tensor:
    """[U] cost of each unit: Σ over `layers` (in their order) of `layer_unit_costs`.

    layers: name → (W (out, in') float64, curvature with A, G, A_inv, G_inv), every layer a unit touches.
    The streaming shot (`passes.surgeon`) adds the same per-layer terms in the same order, one layer at a time.
    """
    device = next(iter(layers.values()))[0].device if layers else None
    total = torch.zeros(len(units), dtype=torch.float64, device=device)
    for name, (W, curv) in layers.items():
        total += layer_unit_costs(units, name, W, curv)
    return total
