"""Optimal compensating updates Δθ = −F⁻¹ Eᵀ (E F⁻¹ Eᵀ)⁻¹ Eθ for F = G ⊗ A, on a layer matrix W (out, in').

Structured (exact for the full G ⊗ A):

* rows R:    ΔW = −G⁻¹_{:,R} (G⁻¹_RR)⁻¹ W_R
* columns C: ΔW = −W_{:,C} (A⁻¹_CC)⁻¹ A⁻¹_{C,:}
* rows R and columns C together: rows first, then columns of the row-updated matrix.  This is the exact joint
  optimum: after the rows are fixed, the remaining problem for the kept rows K is ½ tr(G_KK Y A Yᵀ) with fixed
  columns, whose solution (the column formula) does not depend on G_KK; and the row update of K equals
  −G_KK⁻¹ G_KR ΔW_R, the minimiser for fixed ΔW_R.

Unstructured / N:M: every row i has its own removed set R_i (kept set K_i) and, with F = diag(G) ⊗ A
(exact for the full G ⊗ A when G is diagonal), its own problem  min ½ δ A δᵀ  s.t.  δ_{R_i} = −W_{i,R_i}:

* exact (`rowwise_update`, the reference):  ΔW_i = −W_{i,R_i} (A⁻¹_{R_i R_i})⁻¹ A⁻¹_{R_i,:}, equivalently
  W'_{i,K_i} = (A_{K_i K_i})⁻¹ (W_i A)_{K_i}.  One |R_i| × |R_i| Cholesky per row: O(out · k³) per layer with
  k ≈ |R_i| (about in/2 at 50 %), the cost that made SmolLM2 unstructured 50 % take 725 s.
* sweep (`sweep_update`, used by the driver): SparseGPT's column elimination with a fixed mask and one shared
  factor, then a few conjugate-gradient steps towards the exact rule.  Columns are visited in an order π
  (most-removed columns first); in that order A = Lᵀ L with L lower triangular (L = U⁻ᵀ for SparseGPT's upper
  Cholesky factor U of A⁻¹ = Uᵀ U), so ½ δ A δᵀ = ½ ‖L δ‖² for a row δ.  The sweep sets every removed weight
  to zero and solves, by forward substitution shared by all rows,

      δ_R = −W_R,      (L δ)_j = 0  for every kept j,

  which is SparseGPT's  e_i = W_ic / U_cc,  W_{i,c:} −= e_i U_{c,c:}  (c ∈ R_i): each step is the exact OBS
  removal of one weight when only the columns from c on may move.  The exact rule instead has
  (Lᵀ L δ)_j = 0 for kept j: a kept weight visited before a removed one is frozen by the sweep and cannot help
  compensate it.  So the sweep equals the exact rule whenever, in every row, all removed columns come before
  all kept ones in π (nested masks, whole columns) and is an approximation otherwise.
  `refine` steps of conjugate gradients on the kept weights (A_KK δ_K = −A_KR δ_R per row, started at the
  sweep) close the gap, preconditioned by M = L_KKᵀ L_KK, the part of A_KK = L_KKᵀ L_KK + L_RKᵀ L_RK that the
  sweep already inverts (two masked triangular solves).  They converge to the exact rule (in at most
  |K_i| steps in exact arithmetic); on SmolLM2's layers at 50 % three steps bring the layer objective from
  1.4–6× the exact one's to 1.004–1.8× (docs/pruning.md).  Cost O(in³ + (1 + 3·refine) · out · in²) per
  layer, all GEMMs but one out × `block` strip per column and solve: the factor is shared by all rows, the
  masks differ.
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



def sweep_update(W: Tensor, A: Tensor, removed: Tensor, refine: int = 3, block: int = 128) -> Tensor:
    """W (out, in') after removing the entries where `removed` (bool, W's shape): the sweep, then `refine`
    preconditioned conjugate-gradient steps towards the exact per-row rule (see the module docstring).

    A: the damped input factor (in', in').  Columns go most-removed first (ties in column order; a bias
    column, never removed, goes last among the untouched).  Entries already zero and marked removed stay
    zero (constraints, as in `rowwise_update`); a row with nothing removed is unchanged.
    """
    order = torch.argsort(removed.sum(0), descending=True, stable=True)
    Ap = A[order[:, None], order[None, :]]
    L = torch.linalg.cholesky(Ap.flip(0, 1)).flip(0, 1).t()  # lower triangular, Lᵀ L = Ap
    Lt = L.t().flip(0, 1)  # lower triangular: Lᵀ in reversed order
    W, drop = W[:, order], removed[:, order]
    keep, zero = ~drop, torch.zeros_like(W)
    delta = masked_lower_solve(L, zero, keep, -W, block)  # the sweep

    def precondition(r: Tensor) -> Tensor:  # M⁻¹ r = L_KK⁻¹ L_KK⁻ᵀ r, zero on removed entries
        y = masked_lower_solve(Lt, r.flip(1), keep.flip(1), zero, block).flip(1)
        return masked_lower_solve(L, y, keep, zero, block)

    r = -(delta @ Ap) * keep  # minus the gradient on the kept weights
    z = precondition(r) if refine else r
    p, rz = z, (r * z).sum(1)
    for step in range(refine):
        q = (p @ Ap) * keep
        alpha = _ratio(rz, (p * q).sum(1))
        delta = delta + alpha[:, None] * p
        if step + 1 == refine:
            break
        r = r - alpha[:, None] * q
        z = precondition(r)
        rz_next = (r * z).sum(1)
        p, rz = z + _ratio(rz_next, rz)[:, None] * p, rz_next
    out = W + delta
    out[drop] = 0
    result = torch.empty_like(out)
    result[:, order] = out
    return result


def masked_lower_solve(L: Tensor, b: Tensor, free: Tensor, fixed: Tensor, block: int = 128) -> Tensor:
    """x (rows, n) with x = `fixed` where not `free` and (x Lᵀ)_ij = b_ij where `free` (L lower triangular n × n):
    every row's forward substitution over its own free set, all rows at once.

    Column j: x_j = (b_j − Σ_{k<j} L_jk x_k) / L_jj on free entries.  Inside a block of `block` columns the
    substitution goes column by column; the earlier blocks enter as one GEMM per block (SparseGPT's lazy
    batching).
    """
    x = torch.empty_like(b)
    for b1 in range(0, b.shape[1], block):
        b2 = min(b.shape[1], b1 + block)
        rhs = b[:, b1:b2] - x[:, :b1] @ L[b1:b2, :b1].t()
        for j in range(b1, b2):
            value = (rhs[:, j - b1] - x[:, b1:j] @ L[j, b1:j]) / L[j, j]
            x[:, j] = torch.where(free[:, j], value, fixed[:, j])
    return x


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den per row, 0 where den is 0 (rows whose residual vanished or that keep nothing)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)
