"""Groups of coupled prunable units: what the dependency graph hands to the pruning passes.

A *unit* is the smallest thing that can be removed on its own: one MLP neuron, one attention head (with its
slices in Q, K, V and O), one residual-stream channel, one conv channel with its BatchNorm entries.  Removing a
unit removes, in every parameter it touches, the indices listed in its slices.  A *group* is the set of units
that are interchangeable along one coupled dimension (all neurons of one MLP, all heads of one attention).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def param_name(module: str, attr: str = "weight") -> str:
    """Qualified name of parameter `attr` of the module named `module` ("" is the root: just `attr`)."""
    return f"{module}.{attr}" if module else attr


@dataclass(frozen=True)
class Slice:
    """Indices `index` of dimension `dim` of the parameter or buffer `param` (qualified name)."""

    param: str
    dim: int
    index: torch.Tensor  # LongTensor [k], sorted, unique


@dataclass(frozen=True)
class Unit:
    """One removable unit: every slice it owns, in any number of parameters."""

    slices: tuple[Slice, ...]

    def numel(self, shapes: dict[str, torch.Size]) -> int:
        """Elements removed by this unit alone, given the parameter shapes (overlaps counted once)."""
        by_param: dict[str, dict[int, set[int]]] = {}
        for s in self.slices:
            by_param.setdefault(s.param, {}).setdefault(s.dim, set()).update(s.index.tolist())
        total = 0
        for name, dims in by_param.items():
            shape = shapes[name]
            kept = 1
            for d, n in enumerate(shape):
                kept *= n - len(dims.get(d, ()))
            full = 1
            for n in shape:
                full *= n
            total += full - kept
        return total


@dataclass
class Group:
    """A coupled dimension: `units[i]` is unit i; `kind` says what a unit is.

    kind: "heads" (query heads that share KV heads are removed with them), "kv_heads", "neurons",
    "residual", "channels" or "dims".  `exact` is False where removal is not the same as zeroing the unit
    (a normalisation reduces over the dimension).  `multiple` is the granularity constraint of the
    dimension (e.g. query heads per KV head); `min_keep` units must always stay.
    """

    name: str
    kind: str
    units: list[Unit]
    exact: bool = True
    min_keep: int = 1
    multiple: int = 1
    modules: tuple[str, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return len(self.units)

    def params(self) -> set[str]:
        return {s.param for u in self.units for s in u.slices}

    @property
    def floor(self) -> int:
        """The fewest units the group can keep: `min_keep`, rounded up to a multiple of `multiple`."""
        m = max(1, self.multiple)
        return -(-max(1, self.min_keep) // m) * m


def prunable_params(model: nn.Module, groups: list[Group]) -> list[str]:
    """Sorted names of the parameters some group touches (buffers left out; a tied tensor under its first name)."""
    params = dict(model.named_parameters())
    return sorted({p for g in groups for p in g.params() if p in params})


def prunable_count(model: nn.Module, groups: list[Group]) -> int:
    """Parameters some group touches (the denominator of a structured target)."""
    params = dict(model.named_parameters())
    return sum(params[p].numel() for p in prunable_params(model, groups))


def unit_sizes(model: nn.Module, groups: list[Group]) -> dict[str, list[int]]:
    """group → parameters each unit removes on its own (`Unit.numel` over its parameter slices; buffers left out,
    each tied tensor under its first name)."""
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    return {g.name: [Unit(tuple(s for s in u.slices if s.param in params)).numel(shapes) for u in g.units]
            for g in groups}
