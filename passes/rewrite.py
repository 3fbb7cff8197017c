"""Rewrite pass: remove units from a model, producing a physically smaller one (or a masked reference).

Input: the dependency graph and `removed = {group name: [unit indices]}`.  Output: a `ShrinkPlan` — the new
shape of every changed parameter and buffer, the module attributes that change with them (in_features,
num_heads, …) and, for Hugging Face models, the config fields — applied to the model in place.  The same plan
rebuilds the module tree of a freshly constructed model before loading saved weights (`apply_plan`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from surgeon_fx.graph import DependencyGraph
from surgeon_fx.layers import kind_of

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
WIDTH_ATTRS = ("split_size", "all_head_size", "inner_dim")  # = heads × head_dim
CONFIG_PREFIX = "config."  # a module attribute key naming a field of the module's own config copy


class RewriteError(ValueError):
    """The requested removal is not valid for this graph (unknown group, index out of range, empty group)."""


@dataclass
class ShrinkPlan:
    """Declarative description of a shrunk model: enough to rebuild its module tree from the original.

    added: parameters the original does not have (a bias FLAP's compensation gave a consumer), name → shape.
    """

    shapes: dict[str, list[int]] = field(default_factory=dict)
    attrs: dict[str, dict[str, object]] = field(default_factory=dict)
    config: dict[str, object] = field(default_factory=dict)
    added: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"shapes": self.shapes, "attrs": self.attrs, "config": self.config, "added": self.added}

    @classmethod
    def from_json(cls, data: dict) -> "ShrinkPlan":
        return cls(dict(data.get("shapes", {})), dict(data.get("attrs", {})), dict(data.get("config", {})),
                   dict(data.get("added", {})))


def removed_indices(graph: DependencyGraph, removed: dict[str, list[int]]) -> dict[str, dict[int, torch.Tensor]]:
    """{param: {dim: sorted unique indices to remove}} for the units in `removed`; validates the request."""
    out: dict[str, dict[int, set[int]]] = {}
    for name, units in removed.items():
        group = graph.group(name) if any(g.name == name for g in graph.groups) else None
        if group is None:
            raise RewriteError(f"unknown group {name!r}")
        units = sorted(set(int(u) for u in units))
        if units and (units[0] < 0 or units[-1] >= group.size):
            raise RewriteError(f"group {name}: unit index out of range 0..{group.size - 1}")
        if group.size - len(units) < group.min_keep:
            raise RewriteError(f"group {name}: removing {len(units)} of {group.size} units leaves fewer than "
                               f"{group.min_keep}")
        for u in units:
            for s in group.units[u].slices:
                out.setdefault(s.param, {}).setdefault(s.dim, set()).update(s.index.tolist())
    return {p: {d: torch.tensor(sorted(ix), dtype=torch.long) for d, ix in dims.items()} for p, dims in out.items()}


def _kept(n: int, drop: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (module, attribute, qualified name) holding it (tied weights appear several times)."""
    out: dict[int, list] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is not None:
                    out.setdefault(id(t), []).append((mod, k, f"{mname}.{k}" if mname else k))
    return out


def _replace(model: nn.Module, new: dict[str, torch.Tensor]) -> set[str]:
    """Put `new[name]` in place of each named tensor, in every module that shares it; returns touched modules."""
    owners = _owners(model)
    by_name = {qual: t_id for t_id, holders in owners.items() for (_, _, qual) in holders}
    touched = set()
    for name, value in new.items():
        holders = owners[by_name[name]]
        old = getattr(holders[0][0], holders[0][1])
        is_param = isinstance(old, nn.Parameter)
        tensor = nn.Parameter(value, requires_grad=old.requires_grad) if is_param else value
        for mod, attr, qual in holders:
            (mod._parameters if is_param else mod._buffers)[attr] = tensor
            touched.add(qual.rsplit(".", 1)[0] if "." in qual else "")
    return touched


def _module_attrs(mod: nn.Module) -> dict[str, object]:
    """Size attributes that follow from a module's own (new) parameter shapes."""
    kind = kind_of(mod)
    if kind is not None:
        return kind.size_attrs(mod)
    if isinstance(mod, nn.modules.conv._ConvNd):
        out_c = mod.weight.shape[0]
        if mod.groups > 1:  # depthwise (only kind the graph lets through): groups follow the channels
            return {"in_channels": out_c, "out_channels": out_c, "groups": out_c}
        return {"in_channels": mod.weight.shape[1], "out_channels": out_c}
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        t = mod.weight if mod.weight is not None else mod.running_mean
        return {"num_features": t.shape[0]}
    if isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) and mod.weight is not None:
        return {"normalized_shape": list(mod.weight.shape)}
    if isinstance(mod, nn.GroupNorm):
        return {"num_channels": mod.weight.shape[0]}
    if isinstance(mod, nn.Embedding):
        return {"embedding_dim": mod.weight.shape[1]}
    return {}


def _attention_attrs(mod: nn.Module, heads: tuple[int, int, int, int]) -> dict[str, object]:
    h0, kv0, h1, kv1 = heads
    out: dict[str, object] = {}
    for a in HEAD_ATTRS:
        if isinstance(getattr(mod, a, None), int):
            out[a] = h1
    for a in KV_ATTRS:
        if isinstance(getattr(mod, a, None), int):
            out[a] = kv1
    if isinstance(getattr(mod, "num_key_value_groups", None), int):
        out["num_key_value_groups"] = h1 // kv1
    for a in WIDTH_ATTRS + ("embed_dim",):
        v = getattr(mod, a, None)
        head_dim = getattr(mod, "head_dim", None)
        if isinstance(v, int) and isinstance(head_dim, int) and v == h0 * head_dim:
            out[a] = h1 * head_dim
    cfg = getattr(mod, "config", None)  # HF attention that reads head counts from the config in forward (Phi-3)
    for a, n in (("num_attention_heads", h1), ("num_key_value_heads", kv1)):
        if isinstance(getattr(cfg, a, None), int):
            out[f"{CONFIG_PREFIX}{a}"] = n
    return out


def _set_attrs(model: nn.Module, attrs: dict[str, dict[str, object]]) -> None:
    """Set module attributes; "config.<field>" gives the module its own copy of the shared config first, so
    that layers pruned to different head counts each read their own (Phi-3 slices its fused qkv by
    `self.config.num_attention_heads`)."""
    for mname, values in attrs.items():
        mod = model.get_submodule(mname)
        fields = {k.removeprefix(CONFIG_PREFIX): v for k, v in values.items() if k.startswith(CONFIG_PREFIX)}
        if fields:
            mod.config = copy.copy(mod.config)
            for k, v in fields.items():
                setattr(mod.config, k, v)
        for k, v in values.items():
            if not k.startswith(CONFIG_PREFIX):
                setattr(mod, k, tuple(v) if k == "normalized_shape" else v)


def _config_updates(model: nn.Module, graph: DependencyGraph, removed, heads) -> dict[str, object]:
    """Config fields that change, for a Hugging Face model, where every layer agrees on the new value."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    out: dict[str, object] = {}
    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # a model without token embeddings (Wav2Vec2Model)
        emb = None
    hidden_key = next((k for k in ("hidden_size", "n_embd", "d_model") if isinstance(getattr(cfg, k, None), int)), None)
    if emb is not None and hidden_key and emb.weight.shape[1] != getattr(cfg, hidden_key):
        out[hidden_key] = emb.weight.shape[1]
        if getattr(cfg, "word_embed_proj_dim", None) == getattr(cfg, hidden_key):
            out["word_embed_proj_dim"] = emb.weight.shape[1]
    if heads:
        h_after = {v[2] for v in heads.values()}
        kv_after = {v[3] for v in heads.values()}
        head_dims = {getattr(model.get_submodule(m), "head_dim", None) for m in heads}
        if len(h_after) == 1:
            h = h_after.pop()
            for k in ("num_attention_heads", "n_head"):
                if isinstance(getattr(cfg, k, None), int):
                    out[k] = h
        if len(kv_after) == 1 and hasattr(cfg, "num_key_value_heads"):
            out["num_key_value_heads"] = kv_after.pop()
        if len(head_dims) == 1 and None not in head_dims and out:
            if _settable(cfg, "head_dim"):
                out["head_dim"] = head_dims.pop()
            elif _derived_changes(cfg, out, "head_dim"):  # FalconConfig: hidden_size // num_attention_heads
                for k in ("num_attention_heads", "n_head", "num_key_value_heads"):
                    out.pop(k, None)  # the modules keep the true counts; the config stays the original's
    widths = {}
    for g in graph.groups:
        if g.kind == "neurons":
            widths[g.name] = g.size - len(set(removed.get(g.name, [])))
    inter_key = next((k for k in ("intermediate_size", "ffn_dim", "n_inner") if getattr(cfg, k, None)), None)
    if inter_key and widths and len(set(widths.values())) == 1 and removed:
        new = set(widths.values()).pop()
        if new != getattr(cfg, inter_key):
            out[inter_key] = new
    return out


def _settable(cfg, key: str) -> bool:
    """False for a config field that is a read-only property of its class (FalconConfig.head_dim)."""
    attr = getattr(type(cfg), key, None)
    return not (isinstance(attr, property) and attr.fset is None)


def _derived_changes(cfg, updates: dict[str, object], key: str) -> bool:
    """True when setting `updates` on a copy of `cfg` changes its read-only, derived field `key`."""
    probe = copy.deepcopy(cfg)
    for k, v in updates.items():
        setattr(probe, k, v)
    return getattr(probe, key) != getattr(cfg, key)


def shrink(model: nn.Module, graph: DependencyGraph, removed: dict[str, list[int]]) -> ShrinkPlan:
    """Remove the units `removed` from `model` in place and return the plan that describes the result.

    Every parameter or buffer a removed unit touches is sliced along the unit's dims (ties kept); module
    size attributes, attention head counts and (where uniform) the Hugging Face config follow.  Parameters
    the model gained after `graph` was built (a compensation bias) are recorded in `ShrinkPlan.added`.
    """
    drop = removed_indices(graph, removed)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    new = {}
    for name, dims in drop.items():
        t = state[name].detach()
        for d, ix in dims.items():
            t = t.index_select(d, _kept(t.shape[d], ix).to(t.device))
        new[name] = t.contiguous()
    touched = _replace(model, new)
    plan = ShrinkPlan(shapes={n: list(t.shape) for n, t in new.items()},
                      added={n: list(p.shape) for n, p in model.named_parameters() if n not in graph.param_shapes})
    for mname in sorted(touched):
        attrs = _module_attrs(model.get_submodule(mname))
        if attrs:
            plan.attrs[mname] = attrs
    heads = {m: h for m, h in graph.head_counts(removed).items() if h[0] != h[2] or h[1] != h[3]}
    for mname, h in heads.items():
        plan.attrs.setdefault(mname, {}).update(_attention_attrs(model.get_submodule(mname), h))
    # the config holds one head count for every layer: judged over all attention modules, changed or not
    plan.config = _config_updates(model, graph, removed, graph.head_counts(removed) if heads else {})
    _set_attrs(model, plan.attrs)
    _apply_config(model, plan.config)
    return plan


def _apply_config(model: nn.Module, config: dict[str, object]) -> None:
    cfg = getattr(model, "config", None)
    for k, v in config.items():
        setattr(cfg, k, v)


def apply_plan(model: nn.Module, plan: ShrinkPlan) -> nn.Module:
    """Reshape a freshly built original model to the plan's shapes (uninitialised values), ready to load."""
    for name, shape in plan.added.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        ref = next(module.parameters())
        module.register_parameter(attr, nn.Parameter(torch.empty(shape, dtype=ref.dtype, device=ref.device)))
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    unknown = [n for n in plan.shapes if n not in state]
    if unknown:
        raise RewriteError(f"plan names tensors the model does not have: {unknown[:3]}")
    new = {n: torch.empty(shape, dtype=state[n].dtype, device=state[n].device) for n, shape in plan.shapes.items()}
    _replace(model, new)
    _set_attrs(model, plan.attrs)
    _apply_config(model, plan.config)
    return model


@torch.no_grad()
def mask(model: nn.Module, graph: DependencyGraph, removed: dict[str, list[int]]) -> None:
    """Zero, in place, every slice of the removed units (the dense reference a shrunk model must match)."""
    drop = removed_indices(graph, removed)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, dims in drop.items():
        t = state[name]
        for d, ix in dims.items():
            t.index_fill_(d, ix.to(t.device), 0)
