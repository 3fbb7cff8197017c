"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning with lazy column-block updates.

For one linear layer with weight W [out, in] and inputs X [in, n] the layer-wise
objective is ‖W X − Ŵ X‖²_F with Hessian H = 2 X Xᵀ / n [in, in]. After dampening
(H += λ I, λ = percdamp · mean diag H) let U be the upper Cholesky factor of H⁻¹
(H⁻¹ = Uᵀ U). Columns are pruned left to right; for column c with prune mask M_c

    err   = (W[:, c] − Q[:, c]) / U[c, c]          (Q = W with pruned entries zeroed)
    W[:, c:] −= err ⊗ U[c, c:]                     (OBS compensation on the later columns)

Updates inside a block of ``blocksize`` columns are applied immediately; those to
later columns are batched: W[:, b2:] −= Err[:, b1:b2] · U[b1:b2, b2:].
The mask is chosen adaptively from the current (already updated) weights with
score w² / U[c, c]²: per block of columns for unstructured sparsity (the lowest
``sparsity`` fraction of the block's [out, blocksize] scores), and at the start of
every group of M columns for N:M (keep the N best of M in each row).
"""

import torch
from torch import nn

from surgeon_fx.passes.nm import nm_mask, topk_mask
from surgeon_fx.passes.sequential import InputStats, prune_sequential


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹ [in, in] and the dead-input mask [in].

    Inputs that are always zero (H_ii = 0) get H_ii = 1 so H stays invertible; the
    caller zeroes their weights. Factorised in float64, returned in H's dtype.
    """
    H = H.to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * torch.diagonal(H).mean())
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True), dead


def sparsegpt_prune_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    removed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W [out, in] given H = 2 X Xᵀ / n [in, in].

    Give exactly one of ``sparsity`` (fraction in [0, 1), unstructured) or
    ``n_m=(N, M)`` (keep N of every M consecutive inputs per row; blocksize % M == 0).
    removed: bool [out, in], entries pruned earlier; they score lowest, so they are pruned again (a multi-shot
    caller's constraint).  Returns (W_new [out, in] in W's dtype with zeros outside the mask, keep mask
    [out, in] bool, True = kept).
    """
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity or n_m")
    if n_m is not None and blocksize % n_m[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={n_m[1]}")
    rows, cols = W.shape
    dtype = W.dtype
    U, dead = inverse_hessian_factor(H, percdamp)
    U = U.to(torch.float32)
    W = W.detach().to(torch.float32).clone()
    W[:, dead] = 0.0
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)

    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        W1, U1 = W[:, b1:b2].clone(), U[b1:b2, b1:b2]
        err = torch.zeros_like(W1)
        d = torch.diagonal(U1)
        if sparsity is not None:
            keep[:, b1:b2] = topk_mask(_scores(W1, d, removed, b1), sparsity, per_row=False)
        for i in range(b2 - b1):
            c = b1 + i
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                keep[:, c : c + m] = nm_mask(_scores(W1[:, i : i + m], d[i : i + m], removed, c), n, m)
            w = W1[:, i]
            q = torch.where(keep[:, c], w, torch.zeros_like(w))
            err[:, i] = (w - q) / d[i]
            W1[:, i:] -= err[:, i : i + 1] * U1[i : i + 1, i:]
            W1[:, i] = q
        W[:, b1:b2] = W1
        W[:, b2:] -= err @ U[b1:b2, b2:]
    return W.to(dtype), keep


def _scores(W1: torch.Tensor, d: torch.Tensor, removed: torch.Tensor | None, c: int) -> torch.Tensor:
    """OBS scores w² / U_cc² of the current weights W1 (columns c, c+1, …); −inf where already `removed`."""
    scores = W1**2 / d**2
    if removed is None:
        return scores
    return scores.masked_fill(removed[:, c : c + W1.shape[1]].to(scores.device), -torch.inf)


def sparsegpt(
    model: nn.Module,
    calib_windows: torch.Tensor,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    batch_size: int = 1,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Prune every linear layer inside the model's repeated blocks, block by block, in place.

    Each block is calibrated on the outputs of the already pruned previous blocks
    (see ``passes.sequential``). Returns {qualified layer name: keep mask [out, in]}.
    """
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity or n_m")

    def prune(W: torch.Tensor, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsegpt_prune_layer(W, stats.hessian(), sparsity, n_m, blocksize, percdamp)

    return prune_sequential(model, calib_windows, prune, full_gram=True, batch_size=batch_size, progress=progress)
