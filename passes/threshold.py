"""Choosing what to remove in a shot: shot targets, global thresholds, N:M masks and unit selection.

Costs are compared *raw* across layers (no per-layer normalisation), as the paper sorts them and as the official
code thresholds them: every cost is an estimate of the same quantity, the increase of the calibration loss, so
raw costs are already on one scale and normalising would only distort the global allocation between layers.

Structured units differ in size (a head removes ~64·4·d parameters, a neuron 3·d), so units are ranked by cost
per removed parameter by default (`per_param=True`), i.e. the cheapest loss increase per parameter saved;
`per_param=False` ranks raw unit costs.  Measured on a tiny Llama (hidden 32, 2 layers, 4 heads, FFN 64) trained
on an order-2 Markov chain (dense test loss 4.019), hand-built neuron + head groups, 4 shots, KFAC, 32
calibration windows: test loss 4.037 (per parameter) vs 4.075 (raw) at 75% kept, 4.077 vs 4.113 at 60% kept.
"""
from __future__ import annotations

import heapq

import torch
from torch import Tensor

from surgeon_fx.passes.nm import nm_mask


def shot_targets(target: float, shots: int, schedule: str = "linear") -> list[float]:
    """Fraction kept after each shot t = 1..T; "linear": target + (1 − target)·(T − t)/T (the last is `target`)."""
    if schedule != "linear":
        raise ValueError(f"unknown schedule {schedule!r} (only 'linear')")
    if shots < 1 or not 0.0 < target <= 1.0:
        raise ValueError(f"need shots ≥ 1 and 0 < target ≤ 1, got {shots}, {target}")
    return [target + (1.0 - target) * (shots - t) / shots for t in range(1, shots + 1)]


def global_masks(costs: dict[str, Tensor], removed: dict[str, Tensor], n_remove: int) -> dict[str, Tensor]:
    """Cumulative removed masks after removing the `n_remove` cheapest entries over all layers together.

    costs: name → cost tensor; removed: name → bool tensor of the same shape (entries removed earlier, which
    always stay removed and count towards `n_remove`).  Exactly max(n_remove, already removed) entries are
    removed; ties at the threshold are broken by (layer order, flat position).
    """
    names = list(costs)
    flat = torch.cat([torch.where(removed[n], -torch.inf, costs[n].float()).reshape(-1) for n in names])
    k = min(max(n_remove, int(sum(int(removed[n].sum()) for n in names))), flat.numel())
    picked = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        kth = flat.kthvalue(k).values
        picked = flat < kth
        ties = flat == kth
        need = k - int(picked.sum())
        picked |= ties & (torch.cumsum(ties, 0) <= need)
    out, pos = {}, 0
    for n in names:
        size = costs[n].numel()
        out[n] = picked[pos:pos + size].reshape(costs[n].shape)
        pos += size
    return out


def nm_removed(cost: Tensor, removed: Tensor, n_keep: int, m: int) -> Tensor:
    """Cumulative removed mask keeping, in every M consecutive input columns of each row, the `n_keep` entries
    with the highest cost (entries removed earlier count as cheapest, so they stay removed)."""
    return ~nm_mask(torch.where(removed, -torch.inf, cost.float()), n_keep, m)


def select_units(scores: dict[str, Tensor], sizes: dict[str, list[int]], removed: dict[str, set[int]],
                 n_params: int, min_keep: dict[str, int], multiple: dict[str, int]) -> dict[str, list[int]]:
    """Units to remove in this shot, cheapest first across all groups, landing as close to `n_params` as the
    unit sizes allow.

    scores: group → [U] ranking score (lower = removed first); sizes: group → parameters removed per unit.
    Constraints per group: at least `min_keep` units stay; with `multiple` m > 1 units go m at a time (a first
    item also removes the remainder when the count alive is not a multiple), so the count kept stays a multiple
    of m.  An item's score is its mean unit score.  An item that would overshoot is taken only when that lands
    closer to `n_params` than stopping short; otherwise it is skipped, with the rest of its group (which ranks
    after it), and cheaper-ranked items of other groups may still fill the gap.  So |removed − n_params| ≤ half
    the largest item (a 4-head model no longer lands a whole head below a 0.7 target); it falls short further
    only when every group is at its floor.
    """
    queues: dict[str, list[list[int]]] = {}
    for g, sc in scores.items():
        alive = [u for u in torch.argsort(sc, stable=True).tolist() if u not in removed[g]]
        m = max(1, multiple.get(g, 1))
        floor = -(-max(1, min_keep.get(g, 1)) // m) * m  # smallest multiple of m that is ≥ min_keep
        removable = max(0, len(alive) - floor)
        head = len(alive) % m
        cuts = ([head] if head else []) + list(range(head + m, removable + 1, m))
        start, items = 0, []
        for stop in cuts:
            if stop <= removable:
                items.append(alive[start:stop])
                start = stop
        queues[g] = items[::-1]
    heap = []
    for g, items in queues.items():
        if items:
            heap.append((_score(scores[g], items[-1]), g))
    heapq.heapify(heap)
    out: dict[str, list[int]] = {g: [] for g in scores}
    total = 0
    while heap and total < n_params:
        _, g = heapq.heappop(heap)
        item = queues[g].pop()
        size = sum(sizes[g][u] for u in item)
        if total + size - n_params > n_params - total:  # stopping short is closer: skip it and its group
            continue
        out[g].extend(item)
        total += size
        if queues[g]:
            heapq.heappush(heap, (_score(scores[g], queues[g][-1]), g))
    return {g: sorted(v) for g, v in out.items()}


def _score(sc: Tensor, item: list[int]) -> float:
    return float(sc[item].mean())
