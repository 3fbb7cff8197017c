"""Optimal compensating updates Δθ = −F⁻¹ Eᵀ (E F⁻¹ Eᵀ)⁻¹ Eθ for F = G ⊗ A, on a layer matrix W (out, in').

Structured (exact for the full G ⊗ A):

* rows R:    ΔW = −G⁻¹_{:,R} (G⁻¹_RR)⁻¹ W_R
* columns C: ΔW = −W_{:,C} (A⁻¹_CC)⁻¹ A⁻¹_{C,:}
* rows R and columns C together: rows first, then columns of the row-updated matrix.  This is the exact joint
  optimum: after the rows are fixed, the remaining problem for the kept rows K is ½ tr(G_KK Y A Yᵀ) with fixed
  columns, whose solution (the column formula) does not depend on G_KK; and the row update of K equals
  −G_KK⁻¹ G_KR ΔW_R, the minimiser for fixed ΔW_R.

Unstructured / N:M (`rowwise_update`): every row i solves its own problem with its removed set R_i,

    ΔW_i = −W_{i,R_i} (A⁻¹_{R_i R_i})⁻¹ A⁻¹_{R_i,:},

which is the exact optimum of the constrained problem when rows are decoupled, F = diag(G) ⊗ A (exact for
the full G ⊗ A when G is diagonal).  The full-G problem couples every removed weight of the layer in one
(Σ|R_i|)² system; the row-wise problem needs only |R_i|² per row.  Rows are processed in chunks whose padded
systems fit `budget` float64 entries; each chunk writes its Lagrange multipliers λ_i = W_{i,R_i}(A⁻¹_RR)⁻¹ into a
left factor Λ (out, in') and the update is one GEMM per layer: ΔW = −Λ A⁻¹.
"""
from __future__ import annotations

import torch
from torch import Tensor


def row_update(W: Tensor, G_inv: Tensor, rows: Tensor) -> Tensor:
    """ΔW (out, in') = −G⁻¹_{:,R} (G⁻¹_RR)⁻¹ W_R, removing rows R exactly."""
    lam = torch.linalg.solve(G_inv[rows[:, None], rows[None, :]], W[rows])
    return -G_inv[:, rows] @ lam


def col_update(W: Tensor, A_inv: Tensor, cols: Tensor) -> Tensor:
    """ΔW (out, in') = −W_{:,C} (A⁻¹_CC)⁻¹ A⁻¹_{C,:}, removing columns C exactly."""
    lam = torch.linalg.solve(A_inv[cols[:, None], cols[None, :]], W[:, cols].t()).t()
    return -lam @ A_inv[cols]


def remove_rows_cols(W: Tensor, G_inv: Tensor, A_inv: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """W after removing rows R and columns C with the joint optimal update (removed entries set to exact 0)."""
    out = W.clone()
    if rows.numel():
        out += row_update(out, G_inv, rows)
    if cols.numel():
        out += col_update(out, A_inv, cols)
    out[rows] = 0
    out[:, cols] = 0
    return out


def rowwise_update(W: Tensor, A_inv: Tensor, removed: Tensor, budget: int = 1 << 24) -> Tensor:
    """W after removing the entries where `removed` (bool, W's shape) with each row's own optimal update.

    Entries already zero and marked removed act as constraints (they stay zero).  Memory: at most about
    `budget` float entries for a chunk's padded [rows, k, k] systems (k = largest |R_i| in the chunk), plus Λ.
    """
    out_dim = W.shape[0]
    counts = removed.sum(1)
    lam = torch.zeros_like(W)
    order = torch.sort(removed.to(torch.int8), dim=1, descending=True, stable=True).indices
    k_max = int(counts.max()) if out_dim else 0
    if k_max == 0:
        return W.clone()
    chunk = max(1, budget // (k_max * k_max))
    for start in range(0, out_dim, chunk):
        stop = min(out_dim, start + chunk)
        k = int(counts[start:stop].max())
        if k == 0:
            continue
        idx = order[start:stop, :k]  # [c, k]; the first counts[i] entries are row i's removed columns
        valid = torch.arange(k)[None, :] < counts[start:stop, None]
        S = A_inv[idx[:, :, None], idx[:, None, :]]  # [c, k, k]
        pair = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(k, dtype=W.dtype).expand_as(S)
        S = torch.where(pair, S, eye)  # padding: identity rows with zero right-hand side → λ = 0
        rhs = torch.where(valid, W[start:stop].gather(1, idx), torch.zeros((), dtype=W.dtype))
        L = torch.linalg.cholesky(S)
        sol = torch.cholesky_solve(rhs[:, :, None], L)[:, :, 0]
        lam[start:stop].scatter_(1, idx, torch.where(valid, sol, torch.zeros((), dtype=W.dtype)))
    out = W - lam @ A_inv
    out[removed] = 0
    return out
