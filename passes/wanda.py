"""Wanda (Sun et al., 2023): prune by |weight| × input-activation norm, without weight update.

For W [out, in] and calibration inputs X [n, in] the score is

    S_ij = |W_ij| · ‖X_j‖₂,

compared within each output row: unstructured prunes the lowest ``sparsity``
fraction of every row; N:M keeps the N best of every M consecutive inputs in
every row. Pruned weights are set to zero; the others stay as they are.
"""

import torch
from torch import nn

from surgeon_fx.passes.nm import nm_mask, topk_mask
from surgeon_fx.passes.sequential import InputStats, prune_sequential


def wanda_scores(W: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| · ‖X_j‖₂ broadcast over rows: W [out, in], col_norms [in] -> [out, in]."""
    return W.abs() * col_norms.to(W.dtype)[None, :]


def wanda_prune_layer(
    W: torch.Tensor,
    col_norms: torch.Tensor,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W [out, in] given ‖X_j‖₂ [in]; exactly one of ``sparsity`` or ``n_m=(N, M)``.

    Returns (W_new [out, in] with pruned entries zeroed, keep mask [out, in], True = kept).
    """
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity or n_m")
    scores = wanda_scores(W, col_norms)
    keep = topk_mask(scores, sparsity, per_row=True) if n_m is None else nm_mask(scores, *n_m)
    return torch.where(keep, W, torch.zeros_like(W)), keep


def wanda(
    model: nn.Module,
    calib_windows: torch.Tensor,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    batch_size: int = 1,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Prune every linear layer inside the model's repeated blocks, block by block, in place.

    Returns {qualified layer name: keep mask [out, in]}.
    """
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity or n_m")

    def prune(W: torch.Tensor, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
        return wanda_prune_layer(W, stats.column_norms(), sparsity, n_m)

    return prune_sequential(model, calib_windows, prune, full_gram=False, batch_size=batch_size, progress=progress)
