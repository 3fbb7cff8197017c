"""FLAP (An et al., AAAI 2024): fluctuation-based structured pruning with bias compensation, no retraining.

For a consumer layer W [out, in] (o_proj of the heads, down_proj of the MLP neurons) and its calibration
inputs x ∈ R^in over n tokens, the fluctuation metric of input channel j is

    S_j = Var(x_j) · ‖W[:, j]‖²,    Var(x_j) = Σ_t (x_tj − x̄_j)² / (n − 1)      (sample variance),

the output change (in squared norm) when channel j is replaced by its mean.  Scores are standardised,
Ŝ = (S − mean S) / std S, so that different layers and structures compare on one scale:
``standardise="layer"`` over each consumer layer's channels (the official code, per layer and per type),
``"kind"`` over all layers of one type (every o_proj together, every down_proj together).  A unit's score is
the mean Ŝ of its consumer columns (a head: its head_dim channels).  Selection is global and adaptive: the
lowest-scored units over all groups go first (`threshold.select_units`, ranked by raw score) until the
prunable parameters kept reach the target (each unit weighs its size, as the official code weighs a head
512/3 neurons), so layers and structures lose different fractions.

Bias compensation: the removed channels R are replaced by their calibration mean, b ← b + W[:, R] x̄_R; a
consumer without a bias gets one (the rewrite and the emitted model keep it: `rewrite.ShrinkPlan.added`).

Statistics are those of the dense model (the official code scores every layer before removing anything);
they are collected block by block with `sequential.run_blocks`.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from surgeon_fx.groups import Group, prunable_count, unit_sizes
from surgeon_fx.passes.consumers import consumer_columns, kept_count, zero_units
from surgeon_fx.passes.sequential import InputStats, run_blocks, weight_out_in
from surgeon_fx.passes.threshold import select_units

STANDARDISE = ("layer", "kind")


def fluctuation(W: Tensor, variance: Tensor) -> Tensor:
    """S_j = Var(x_j) · ‖W[:, j]‖²: W [out, in], variance [in] → [in] (float64)."""
    return variance.double() * W.double().pow(2).sum(0)


def standardised(scores: dict[str, Tensor], by: str) -> dict[str, Tensor]:
    """Ŝ = (S − mean) / std per layer (by="layer") or per layer type (by="kind": block index ignored)."""
    if by not in STANDARDISE:
        raise ValueError(f"standardise must be one of {STANDARDISE}, not {by!r}")
    kind = {n: re.sub(r"\.\d+\.", ".*.", n) if by == "kind" else n for n in scores}
    pooled = {k: torch.cat([scores[n] for n in scores if kind[n] == k]) for k in set(kind.values())}
    return {n: (s - pooled[kind[n]].mean()) / pooled[kind[n]].std() for n, s in scores.items()}


def consumer_stats(model: nn.Module, windows: Tensor, layers: set[str], batch_size: int = 1,
                   progress: bool | None = None) -> dict[str, InputStats]:
    """Float64 Σx, Σx² of the inputs of `layers` on the calibration windows (the model is not changed)."""
    stats: dict[str, InputStats] = {}
    def record(_prefix: str, _block: nn.Module, block_stats: dict[str, InputStats]) -> bool:
        stats.update(block_stats)
        return False  # the dense model: each block runs once

    run_blocks(model, windows, record, lambda: InputStats(False, torch.float64), batch_size, progress, layers=layers)
    missing = sorted(layers - set(stats))
    if missing:
        raise ValueError(f"consumer layers outside the model's blocks or never called: {missing[:3]}")
    return stats


def select_global(model: nn.Module, groups: list[Group], scores: dict[str, Tensor], target: float
                  ) -> dict[str, list[int]]:
    """Lowest scores first over all groups until round(target × prunable) parameters are kept (± a unit).

    Units of different groups may share parameters (a head and the KV head it belongs to), so the kept count
    is recounted after each round of `select_units` (which lands as close to its count as unit sizes allow)
    and the rest selected again.
    """
    sizes = unit_sizes(model, groups)
    goal = round(target * prunable_count(model, groups))
    removed: dict[str, set[int]] = {g.name: set() for g in groups}
    kept = kept_count(model, groups, removed)
    while kept > goal:
        new = select_units(scores, sizes, removed, kept - goal, {g.name: g.min_keep for g in groups},
                           {g.name: getattr(g, "multiple", 1) for g in groups})
        if not any(new.values()):
            break  # every group at its floor
        for name, units in new.items():
            removed[name].update(units)
        kept = kept_count(model, groups, removed)
    return {name: sorted(units) for name, units in removed.items()}


@torch.no_grad()
def compensate_bias(model: nn.Module, columns: dict[str, list[dict[str, Tensor]]],
                    removed: dict[str, list[int]], means: dict[str, Tensor]) -> None:
    """b ← b + W[:, R] x̄_R for every consumer layer, R its removed columns; adds a zero bias where none."""
    modules = dict(model.named_modules())
    cols: dict[str, list[Tensor]] = {}
    for group, units in removed.items():
        for u in units:
            for layer, c in columns[group][u].items():
                cols.setdefault(layer, []).append(c)
    for layer, parts in cols.items():
        m = modules[layer]
        R = torch.unique(torch.cat(parts))
        W = weight_out_in(m)
        shift = (W[:, R].double() @ means[layer][R].to(W.device)).to(W.dtype)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(W.shape[0], dtype=W.dtype, device=W.device))
        m.bias.add_(shift)


def flap(model: nn.Module, calib_windows: Tensor, groups: list[Group], target: float, bias: bool = True,
         standardise: str = "layer", batch_size: int = 1, progress: bool | None = None) -> dict[str, list[int]]:
    """Prune `groups` of `model` to `target` (fraction of their parameters kept) in place: removed units are
    zeroed, consumers get the bias compensation (bias=True).  Returns {group name: removed unit indices}, the
    input of `rewrite.shrink`."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    columns = consumer_columns(model, groups)
    layers = {layer for units in columns.values() for cols in units for layer in cols}
    stats = consumer_stats(model, calib_windows, layers, batch_size, progress)
    modules = dict(model.named_modules())
    channel = standardised({n: fluctuation(weight_out_in(modules[n]).detach(), stats[n].variance()) for n in layers},
                           standardise)
    scores = {g.name: torch.stack([torch.cat([channel[layer][c] for layer, c in cols.items()]).mean()
                                   for cols in columns[g.name]]) for g in groups}
    removed = select_global(model, groups, scores, target)
    if bias:
        compensate_bias(model, columns, removed, {n: s.mean() for n, s in stats.items()})
    zero_units(model, groups, removed)
    return removed
