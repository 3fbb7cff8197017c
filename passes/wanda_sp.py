"""Wanda-sp: structured Wanda, the baseline of the FLAP paper (An et al., 2024), uniform over layers.

Wanda scores a weight by S_ij = |W_ij| · ‖X_j‖₂ (`wanda.wanda_scores`).  A structured unit is scored by the
sum of the Wanda scores of the weights it owns in its consumer layer (the columns of o_proj a head feeds, the
column of down_proj a neuron feeds), as the official code does (a head: its channels' column scores summed):

    score(unit) = Σ_{j ∈ cols(unit)} Σ_i |W_ij| · ‖X_j‖₂.

Uniform per layer: every block keeps the same fraction `target` of the parameters its groups touch.  Within
a block, the attention keeps whole units at the rate of the official code, ⌊(1 − target)·H⌋ of its H units
removed (lowest scores first; where two groups feed the same consumer — query heads and KV heads — only the
coarser one, the KV heads with their query heads, is pruned); the finest group (the MLP neurons) then loses
its lowest-scored units until the block keeps `target` (overshoot < one unit), so each block, not only the
whole model, meets the target.

Block by block (`sequential.run_blocks`): each block is scored on inputs that went through the already pruned
blocks, its units are zeroed, and its outputs are recomputed for the next block.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from surgeon_fx.groups import Group, prunable_count, unit_sizes
from surgeon_fx.passes.consumers import consumer_columns, zero_units
from surgeon_fx.passes.sequential import InputStats, run_blocks, weight_out_in
from surgeon_fx.passes.wanda import wanda_scores


def unit_scores(W: dict[str, Tensor], norms: dict[str, Tensor], columns: list[dict[str, Tensor]]) -> Tensor:
    """[U] scores Σ_{layer, j ∈ cols} Σ_i |W_ij|·‖X_j‖ for units given as {consumer layer: columns}."""
    per_col = {n: wanda_scores(W[n].float(), norms[n]).sum(0) for n in W}
    return torch.stack([sum(per_col[layer][c].sum() for layer, c in cols.items()) for cols in columns])


def removable(g: Group, n: int) -> int:
    """The largest count ≤ n that `g` may lose: at least `min_keep` units stay, the kept count a multiple."""
    m = max(1, g.multiple)
    n = min(n, max(0, g.size - g.floor))
    return g.size - m * math.ceil((g.size - n) / m)


def block_plan(groups: list[Group], sizes: dict[str, list[int]], scores: dict[str, Tensor],
               columns: dict[str, list[dict[str, Tensor]]], total: int, target: float) -> dict[str, list[int]]:
    """Units one block removes (see the module docstring); total = the block's prunable parameters."""
    consumers: dict[frozenset, list[Group]] = {}
    for g in groups:
        consumers.setdefault(frozenset(l for cols in columns[g.name] for l in cols), []).append(g)
    pruned = sorted((max(gs, key=lambda g: max(sizes[g.name])) for gs in consumers.values()),
                    key=lambda g: -max(sizes[g.name]))
    out, to_remove = {}, total - round(target * total)
    for i, g in enumerate(pruned):
        order = torch.argsort(scores[g.name], stable=True).tolist()
        if i < len(pruned) - 1:
            n = math.floor((1.0 - target) * g.size)
        else:  # the finest group: until the block's target is met
            n, need = 0, to_remove
            while n < g.size and need > 0:
                need -= sizes[g.name][order[n]]
                n += 1
        n = removable(g, n)
        out[g.name] = sorted(order[:n])
        to_remove -= sum(sizes[g.name][u] for u in out[g.name])
    return out


def wanda_sp(model: nn.Module, calib_windows: Tensor, groups: list[Group], target: float, batch_size: int = 1,
             progress: bool | None = None) -> dict[str, list[int]]:
    """Prune `groups` to `target` (fraction of their parameters kept in every block) in place: removed units
    are zeroed.  Returns {group name: removed unit indices}, the input of `rewrite.shrink`."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    columns = consumer_columns(model, groups)
    sizes = unit_sizes(model, groups)
    modules = dict(model.named_modules())
    layers = {layer for units in columns.values() for cols in units for layer in cols}
    removed: dict[str, list[int]] = {}
    visited: set[str] = set()

    def visit(prefix: str, _block: nn.Module, stats: dict[str, InputStats]) -> bool:
        mine = [g for g in groups if all(l.startswith(prefix) for cols in columns[g.name] for l in cols)]
        visited.update(g.name for g in mine)
        if not mine:
            return False
        W = {n: weight_out_in(modules[n]).detach() for n in stats}
        norms = {n: s.column_norms() for n, s in stats.items()}
        scores = {g.name: unit_scores(W, norms, columns[g.name]) for g in mine}
        plan = block_plan(mine, sizes, scores, columns, prunable_count(model, mine), target)
        zero_units(model, mine, plan)
        removed.update(plan)
        return True

    run_blocks(model, calib_windows, visit, lambda: InputStats(False), batch_size, progress, layers=layers)
    outside = [g.name for g in groups if g.name not in visited]
    if outside:
        raise ValueError(f"Wanda-sp prunes block by block; these groups feed layers outside one block: "
                         f"{outside[:3]}")
    return {g.name: removed.get(g.name, []) for g in groups}
