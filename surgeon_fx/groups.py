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


class Slice:
    """Indices `index` (LongTensor [k], sorted, unique) of dimension `dim` of the parameter or buffer `param`
    (qualified name).

    Kept as a `range` when the indices are contiguous (a neuron, a head), else as a tuple, and `index` builds
    the tensor on each read: a graph holds ~3·10⁵ slices for SmolLM2-135M and ~10⁶ for a Llama-7B shape, and a
    small tensor each cost ≈ 0.6 KB (0.18 GiB resident for SmolLM2, for the whole run)."""

    __slots__ = ("param", "dim", "_at")

    def __init__(self, param: str, dim: int, index):
        at = [int(i) for i in torch.as_tensor(index).reshape(-1).tolist()]
        self.param, self.dim = param, dim
        self._at = range(at[0], at[-1] + 1) if at and at[-1] - at[0] + 1 == len(at) else tuple(at)

    @property
    def index(self) -> torch.Tensor:
        at = self._at
        if isinstance(at, range):
            return torch.arange(at.start, at.stop)
        return torch.tensor(at, dtype=torch.long)

    def __eq__(self, other) -> bool:
        return isinstance(other, Slice) and (self.param, self.dim, self._at) == (other.param, other.dim, other._at)

    def __hash__(self) -> int:
        return hash((self.param, self.dim, self._at))

    def __repr__(self) -> str:
        return f"Slice({self.param!r}, {self.dim}, {list(self._at)})"

    def __getstate__(self):
        return (self.param, self.dim, self._at)

    def __setstate__(self, state) -> None:
        self.param, self.dim, self._at = state


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
