"""What the structured peers (FLAP, Wanda-sp) read off the groups: the consumer columns of each unit.

A unit's *consumer columns* are the input columns it owns in linear layers (the columns of o_proj a head
feeds, the column of down_proj a neuron feeds): `blocks.unit_blocks` with every linear layer as a curved
layer, columns in the [out, in] orientation of `sequential.weight_out_in`.  Scores of both peers are functions
of those columns and of the consumer's input statistics.  Unit sizes and the prunable count are
`groups.unit_sizes` / `groups.prunable_count`, as the LLM Surgeon driver counts them, so every structured
method meets the same target.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from surgeon_fx.groups import Group
from surgeon_fx.passes.blocks import unit_blocks
from surgeon_fx.layers import is_linear


def consumer_columns(model: nn.Module, groups: list[Group]) -> dict[str, list[dict[str, Tensor]]]:
    """group → per unit {consumer layer: input column indices}; ValueError for a unit without any."""
    modules = dict(model.named_modules())
    linear = {name for name, m in modules.items() if is_linear(m)}
    out = {}
    for g in groups:
        out[g.name] = [unit_blocks(u, modules, linear).cols for u in g.units]
        if not all(out[g.name]):
            raise ValueError(f"group {g.name}: a unit feeds no linear layer (FLAP and Wanda-sp score the "
                             f"columns of the consumer layer)")
    return out


def kept_count(model: nn.Module, groups: list[Group], removed: dict[str, list[int] | set[int]]) -> int:
    """Parameters of the groups that survive removing `removed` (units of different groups may overlap):
    Σ over parameters of Π_d (n_d − |indices removed along d|)."""
    params = dict(model.named_parameters())
    gone: dict[str, dict[int, set[int]]] = {p: {} for g in groups for p in g.params() if p in params}
    for g in groups:
        for u in removed.get(g.name, ()):
            for s in g.units[u].slices:
                if s.param in gone:
                    gone[s.param].setdefault(s.dim, set()).update(s.index.tolist())
    return sum(math.prod(n - len(gone[p].get(d, ())) for d, n in enumerate(params[p].shape)) for p in gone)


@torch.no_grad()
def zero_units(model: nn.Module, groups: list[Group], removed: dict[str, list[int] | set[int]]) -> None:
    """Zero, in place, every parameter and buffer slice of the removed units (the masked model)."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    for g in groups:
        for u in removed.get(g.name, ()):
            for s in g.units[u].slices:
                if s.param in state:
                    state[s.param].index_fill_(s.dim, s.index.to(state[s.param].device), 0)
