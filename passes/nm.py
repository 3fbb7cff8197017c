"""Keep-mask helpers: N:M semi-structured and unstructured top-k masks.

All masks are boolean tensors of the score's shape; ``True`` means *keep*.
Scores are "higher is more important" (e.g. Wanda's |W_ij|·‖X_j‖₂ or the
inverse of an OBS cost). Ties are broken deterministically by ``torch.topk``.
"""

import torch


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive input columns.

    scores: [out, in] with ``in % m == 0``. Returns a bool mask [out, in] with
    exactly ``n`` True entries in each row's group ``[g*m, (g+1)*m)``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    if not 0 < n <= m:
        raise ValueError(f"need 0 < n <= m, got n={n}, m={m}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input width {cols} is not a multiple of m={m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune (set False) the lowest ``sparsity`` fraction of scores.

    per_row=True: in every row of [out, in] prune ``floor(sparsity * in)`` entries
    (Wanda's per-output comparison group). per_row=False: prune
    ``floor(sparsity * numel)`` entries of the whole tensor (per-layer).
    Returns a bool keep mask of ``scores.shape``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    n_prune = int(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        drop = flat.topk(n_prune, dim=1, largest=False).indices
        keep.scatter_(1, drop, False)
    return keep.reshape(scores.shape)
