"""Round the kept units of every group to a multiple of k (speed of the emitted model).

Matmul kernels run fastest when the widths are multiples of 8 (GPU tensor cores, CPU vector lanes) or of 64
(tiles).  `passes/threshold.select_units` already keeps a multiple of `Group.multiple` units per group;
`with_multiple` returns copies of the groups with that field set (the graph's own groups are not changed).  Groups smaller than 2·k (attention heads: a handful of units each, whose width is already
heads × head_dim) keep their multiple.
"""
from __future__ import annotations

from dataclasses import replace

from surgeon_fx.groups import Group

ROUNDED_KINDS = ("neurons", "channels", "residual")


def with_multiple(groups: list[Group], k: int, kinds: tuple[str, ...] = ROUNDED_KINDS) -> list[Group]:
    """The groups, those of a kind in `kinds` with at least 2·k units as copies with `multiple = k`."""
    if k < 1:
        raise ValueError(f"multiple must be ≥ 1, got {k}")
    return [replace(g, multiple=k) if g.kind in kinds and g.size >= 2 * k else g for g in groups]


def round_keep(keep: int, k: int, size: int) -> int:
    """The multiple of k nearest to `keep` (ties go up), within [k, size]; `size` itself when keep ≥ size."""
    if keep >= size:
        return size
    return max(k, min(size - size % k, k * ((2 * keep + k) // (2 * k))))
