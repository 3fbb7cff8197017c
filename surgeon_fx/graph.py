"""The dependency graph: which indices of which parameters must be removed together.

`build_graph(model, example_inputs)` traces the model (`trace.py`), runs one propagation rule per ATen op
(`rules.py`) over index spaces (`spaces.py`), and reads off the prunable **groups** (`groups.py`): one group per
unfrozen leaf space, one unit per index of that space, each unit holding its index slices in every parameter
(and BatchNorm buffer) it reaches.  A networkx graph over the spaces records which op linked what, so the
graph can explain itself (`describe()`, `explain()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch import nn

from .groups import Group, Slice, Unit
from .rules import RULES, Dims
from .spaces import Spaces
from .trace import Traced, trace

SLICEABLE_BUFFERS = ("running_mean", "running_var")
# ops that keep a parameter a parameter for the matmul rule (`x @ self.weight.T` is a linear layer)
PARAM_VIEWS = frozenset({"view", "_unsafe_view", "reshape", "t", "numpy_T", "transpose", "permute", "_to_copy", "to",
                         "alias", "detach", "contiguous", "expand", "clone", "type_as",
                         "index", "select"})  # an expert's weights gathered from a stacked [experts, ...] tensor

# attention modules whose implementation ties the inner (heads × head_dim) width to the model width
FIXED_WIDTH_ATTENTION = ("MultiheadAttention", "ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def _op_name(target) -> str:
    """`aten.numpy_T.default` -> "numpy_T" (the op's name without namespace and overload)."""
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


@dataclass
class AttentionSite:
    """An attention op: the module that owns it and its query-head space (split kv × rep under GQA)."""

    module: str
    node: str
    head_space: int | None


class Builder:
    """Walks the traced graph once, applying the op rules; owns the spaces and the dims of every node."""

    def __init__(self, traced: Traced, sliceable: set[str], tensor_id: dict[str, int]):
        self.traced = traced
        self.tensor_id = tensor_id  # qualified name -> id of the tensor object (tied weights share one)
        self.first_dims: dict[int, Dims] = {}
        self.spaces = Spaces()
        self.dims: dict[str, object] = {}
        self.links = nx.MultiGraph()
        self.sites: list[AttentionSite] = []
        self.repeats: list[int] = []  # spaces made by broadcasting (expand/repeat): GQA's query-per-kv factor
        self.sliceable = sliceable
        self.unknown_ops: dict[str, str] = {}

    # -- helpers used by the rules ----------------------------------------------------------------------
    @staticmethod
    def shape(arg) -> tuple[int, ...] | None:
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg
        return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None

    def size(self, space: int) -> int:
        return self.spaces.size[self.spaces.find(space)]

    def dims_of(self, arg, whole: bool = False):
        if not isinstance(arg, torch.fx.Node):
            return None
        d = self.dims.get(arg.name)
        if whole:
            return d
        return d if isinstance(d, list) and (not d or isinstance(d[0], int)) else None

    def fresh(self, node, index: int | None = None) -> Dims:
        val = node.meta.get("val")
        if index is not None:
            val = val[index]
        dims = [self.spaces.new(int(s)) for s in val.shape]
        for i, d in enumerate(dims):
            self.links.add_node(d, label=f"{node.name}[{i}]" + (f"#{index}" if index else ""))
        return dims

    def fresh_frozen(self, node, reason: str):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = self.fresh(node)
            for d in dims:
                self.freeze(d, node, reason)
            return dims
        if isinstance(val, (list, tuple)):
            out = []
            for i, v in enumerate(val):
                if isinstance(v, torch.Tensor):
                    dims = self.fresh(node, i)
                    for d in dims:
                        self.freeze(d, node, reason)
                    out.append(dims)
                else:
                    out.append(None)
            return out
        return None

    def union(self, a: int, b: int, node) -> None:
        self.links.add_edge(a, b, op=str(node.target), node=node.name)
        self.spaces.union(a, b)

    def link(self, kids: list[int] | None, others: list[int], node) -> None:
        if kids is None:  # incompatible structures: freeze both sides
            for o in others:
                self.freeze(o, node, "incompatible reshape structure")
            return
        for k, o in zip(kids, others):
            self.union(k, o, node)

    def freeze(self, d: int, node, reason: str) -> None:
        self.spaces.freeze(d, f"{reason} ({node.name}: {node.target})")

    def freeze_all(self, dim_lists, node, reason: str) -> None:
        for dims in dim_lists:
            for d in dims or []:
                self.freeze(d, node, reason)

    def from_param(self, arg) -> bool:
        """True if `arg` is a parameter or a view/transpose/cast of one."""
        seen = arg
        while isinstance(seen, torch.fx.Node):
            if seen.op == "placeholder":
                return seen.name in self.traced.params
            if seen.op != "call_function" or not seen.args or not isinstance(seen.args[0], torch.fx.Node):
                return False
            if _op_name(seen.target) not in PARAM_VIEWS:
                return False
            seen = seen.args[0]
        return False

    def attention_site(self, node, head_space: int | None) -> None:
        module = self.traced.module_of.get(node.name, "")
        fixed = next((m for m in FIXED_WIDTH_ATTENTION if self.traced.module_type_of.get(node.name, "").endswith(m)),
                     None)
        if fixed and head_space is not None:
            self.freeze(head_space, node, f"{fixed} requires q/k/v width = embed_dim (heads cannot be removed)")
        if any(s.module == module and s.head_space is not None and head_space is not None
               and self.spaces.find(s.head_space) == self.spaces.find(head_space) for s in self.sites):
            return
        self.sites.append(AttentionSite(self.traced.module_of.get(node.name, ""), node.name, head_space))

    # -- the walk ---------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.traced.graph.nodes:
            if node.op == "placeholder":
                self.dims[node.name] = self._placeholder(node)
            elif node.op == "call_function":
                self.dims[node.name] = self._call(node)
            elif node.op == "get_attr":
                self.dims[node.name] = self.fresh_frozen(node, "constant")
            elif node.op == "output":
                for arg in torch.fx.node.map_arg(node.args, lambda n: n).__iter__():
                    self._freeze_outputs(arg, node)
        for parent, (kind, kids) in self.spaces.split.items():  # a split links a space to its factors
            for k in kids:
                self.links.add_edge(parent, k, op=f"{kind} split", node="")
        self.spaces.propagate_flags()

    def _placeholder(self, node):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        dims = self.fresh(node)
        qual = self.traced.params.get(node.name) or self.traced.buffers.get(node.name)
        key = self.tensor_id.get(qual)
        if key in self.first_dims:  # a tied weight: the same tensor under a second name
            for a, c in zip(self.first_dims[key], dims):
                self.union(a, c, node)
        elif key is not None:
            self.first_dims[key] = dims
            if not node.users and list(self.tensor_id.values()).count(key) == 1:
                for d in dims:
                    self.freeze(d, node, "unused parameter")
        if node.name in self.traced.params:
            return dims
        if node.name in self.traced.buffers:
            if self.traced.buffers[node.name] in self.sliceable:
                return dims
            reason = "buffer"
        else:
            reason = "model input"
        for d in dims:
            self.freeze(d, node, reason)
        return dims

    def _freeze_outputs(self, arg, node) -> None:
        if isinstance(arg, (list, tuple)):
            for a in arg:
                self._freeze_outputs(a, node)
        elif isinstance(arg, torch.fx.Node):
            dims = self.dims.get(arg.name)
            flat = dims if dims and isinstance(dims[0], int) else [d for sub in dims or [] if sub for d in sub]
            for d in flat:
                self.freeze(d, node, "model output")

    def _call(self, node):
        val = node.meta.get("val")
        fn = RULES.get(node.target)
        if fn is not None:
            args = [self.dims_of(a) for a in node.args]
            try:
                return fn(self, node, args)
            except Exception as err:  # noqa: BLE001 - a rule that cannot apply freezes, never guesses
                reason = f"rule for {node.target} failed: {type(err).__name__}: {err}"
        else:
            if val is None or not (isinstance(val, torch.Tensor) or isinstance(val, (list, tuple))):
                return None
            reason = f"no rule for {node.target}"
        self.unknown_ops[node.name] = reason
        inputs = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: inputs.append(n))
        for n in inputs:
            d = self.dims.get(n.name)
            flat = d if d and isinstance(d[0], int) else [x for sub in d or [] if sub for x in sub]
            for x in flat:
                self.freeze(x, node, reason)
        return self.fresh_frozen(node, reason)


@dataclass
class DependencyGraph:
    """The result of analysis: groups of prunable units plus what is needed to explain and rewrite."""

    traced: Traced
    spaces: Spaces
    dims: dict[str, object]
    links: nx.MultiGraph
    groups: list[Group]
    sites: list[AttentionSite]
    repeats: list[int]
    param_shapes: dict[str, torch.Size]
    unknown_ops: dict[str, str] = field(default_factory=dict)
    group_space: dict[str, int] = field(default_factory=dict)  # group name -> its leaf space

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups: {[g.name for g in self.groups][:8]}...")

    def site_leaves(self, site: AttentionSite) -> list[tuple[int, bool]]:
        """The leaf spaces of an attention's query-head space, each with whether it is a repeat factor."""
        reps = {self.spaces.find(r) for r in self.repeats}
        return [(self.spaces.find(l), self.spaces.find(l) in reps)
                for l, _ in self.spaces.leaf_coords(site.head_space)]

    def head_counts(self, removed: dict[str, list[int]]) -> dict[str, tuple[int, int, int, int]]:
        """Per attention module: (heads, kv heads) before and (heads, kv heads) after removing `removed`."""
        kept_of = {}
        for n, units in removed.items():
            if n in self.group_space:
                leaf = self.spaces.find(self.group_space[n])
                kept_of[leaf] = self.spaces.size[leaf] - len(set(units))
        out = {}
        for s in self.sites:
            if s.head_space is None:
                continue
            leaves = self.site_leaves(s)
            before = [self.spaces.size[l] for l, _ in leaves]
            after = [kept_of.get(l, n) for (l, _), n in zip(leaves, before)]
            kv_b = int(np.prod([n for n, (_, rep) in zip(before, leaves) if not rep]))
            kv_a = int(np.prod([n for n, (_, rep) in zip(after, leaves) if not rep]))
            out[s.module] = (int(np.prod(before)), kv_b, int(np.prod(after)), kv_a)
        return out

    def param_dims(self, param: str) -> Dims:
        for ph, name in {**self.traced.params, **self.traced.buffers}.items():
            if name == param:
                return self.dims[ph]
        raise KeyError(param)

    def explain(self, param: str, dim: int) -> str:
        """Why dimension `dim` of `param` is or is not prunable, in one line."""
        space = self.param_dims(param)[dim]
        root = self.spaces.find(space)
        if root in self.spaces.frozen:
            return f"{param}[{dim}] is frozen: {self.spaces.frozen[root]}"
        leaves = [(l, c) for l, c in self.spaces.leaf_coords(space)]
        names = [g.name for g in self.groups if any(s.param == param and s.dim == dim for s in g.units[0].slices)]
        why = {self.spaces.find(l): self.spaces.frozen.get(self.spaces.find(l)) for l, _ in leaves}
        frozen = [f"{self.spaces.size[l]}-wide factor frozen: {r}" for l, r in why.items() if r]
        if not names:
            single = [f"{self.spaces.size[l]}-wide factor" for l, r in why.items() if not r and self.spaces.size[l] <= 1]
            reasons = frozen + [f"{s} (nothing to remove)" for s in single]
            return f"{param}[{dim}] is not pruned by any group: " + ("; ".join(reasons) or "no free factor")
        return f"{param}[{dim}] is pruned by group(s) {names}" + (f"; {'; '.join(frozen)}" if frozen else "")

    def why_coupled(self, a: tuple[str, int], b: tuple[str, int]) -> list[str]:
        """The chain of ops that couples dim a[1] of parameter a[0] with dim b[1] of b[0] ([] if none)."""
        src, dst = self.param_dims(a[0])[a[1]], self.param_dims(b[0])[b[1]]
        try:
            path = nx.shortest_path(self.links, src, dst)
        except nx.NetworkXNoPath:
            return []
        steps = []
        for u, v in zip(path, path[1:]):
            data = next(iter(self.links.get_edge_data(u, v).values()))
            label = self.links.nodes[v].get("label", f"space {v}")
            steps.append(f"{data['op']} ({data['node']}) → {label}" if data["node"] else f"{data['op']} → {label}")
        return steps

    def describe(self) -> str:
        """Human-readable listing: one line per group, then the attention structures and unknown ops."""
        lines = [f"{len(self.groups)} groups, {sum(g.size for g in self.groups)} units"]
        for g in self.groups:
            params = sorted(g.params())
            shown = ", ".join(params[:4]) + (f", … (+{len(params) - 4})" if len(params) > 4 else "")
            lines.append(f"  {g.name}: {g.size} {g.kind}{'' if g.exact else ' (inexact: normalised)'} — {shown}")
        for s in self.sites:
            if s.head_space is None:
                continue
            leaves = self.site_leaves(s)
            h = int(np.prod([self.spaces.size[l] for l, _ in leaves]))
            kv = int(np.prod([self.spaces.size[l] for l, rep in leaves if not rep]))
            desc = f"{h} query heads" + (f" = {kv} KV heads × {h // kv} query heads each" if kv < h else "")
            lines.append(f"  attention {s.module}: {desc}")
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.unknown_ops.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, nodes in by_reason.items():
            lines.append(f"  frozen ({len(nodes)} nodes, e.g. {nodes[0]}): {reason}")
        return "\n".join(lines)


def _sliceable_buffers(model: nn.Module) -> set[str]:
    out = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            out.update(f"{mname}.{b}" if mname else b for b in SLICEABLE_BUFFERS if getattr(mod, b, None) is not None)
    return out


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-2] for n in names]  # drop "<module>.<param>" tails: the owner of the owners
    if not parts:
        return ""
    prefix = parts[0]
    for p in parts[1:]:
        k = 0
        while k < min(len(prefix), len(p)) and prefix[k] == p[k]:
            k += 1
        prefix = prefix[:k]
    return ".".join(prefix)


def _kind(model: nn.Module, params: set[str]) -> str:
    kinds = set()
    for p in params:
        owner = model.get_submodule(p.rsplit(".", 1)[0]) if "." in p else model
        if isinstance(owner, nn.Embedding):
            kinds.add("residual")
        elif isinstance(owner, nn.modules.conv._ConvNd):
            kinds.add("channels")
    return "residual" if "residual" in kinds else ("channels" if "channels" in kinds else "neurons")


def extract_groups(model: nn.Module, b: Builder) -> tuple[list[Group], dict[str, int]]:
    """One group per unfrozen leaf space of size > 1 that reaches a parameter; one unit per index."""
    sp = b.spaces
    names = {**b.traced.params, **{k: v for k, v in b.traced.buffers.items() if v in b.sliceable}}
    occ: dict[int, list[tuple[str, int, np.ndarray]]] = {}
    for ph, pname in names.items():
        for d, space in enumerate(b.dims.get(ph) or []):
            if sp.size[sp.find(space)] <= 1 or sp.find(space) in sp.frozen:
                continue
            for leaf, coords in sp.leaf_coords(space):
                if leaf in sp.frozen or sp.size[leaf] <= 1:
                    continue
                occ.setdefault(leaf, []).append((pname, d, coords))
    head_kind: dict[int, tuple[str, str]] = {}
    reps = {sp.find(r) for r in b.repeats}
    for s in b.sites:
        if s.head_space is None:
            continue
        leaves = [sp.find(l) for l, _ in sp.leaf_coords(s.head_space)]
        grouped = any(l in reps for l in leaves) and not all(l in reps for l in leaves)
        for l in leaves:
            kind = "kv_heads" if grouped and l not in reps else "heads"
            head_kind.setdefault(l, (kind, s.module))
    groups, used, space_of = [], set(), {}
    for leaf, items in occ.items():
        n = sp.size[leaf]
        per_param: dict[tuple[str, int], list[np.ndarray]] = {}
        for pname, d, coords in items:  # a leaf may occur twice in one dim (RoPE-style pairing)
            per_param.setdefault((pname, d), []).append(coords)
        units = []
        for k in range(n):
            slices = []
            for (pname, d), coords in per_param.items():
                hit = np.logical_or.reduce([c == k for c in coords])
                idx = torch.from_numpy(np.nonzero(hit)[0].astype(np.int64))
                if idx.numel():
                    slices.append(Slice(pname, d, idx))
            units.append(Unit(tuple(slices)))
        params = {p for p, _ in per_param}
        if leaf in head_kind:
            kind, module = head_kind[leaf]
            base = f"{module}.{kind}" if module else kind
        else:
            kind = _kind(model, params)
            prefix = "" if kind == "residual" else _common_prefix(sorted(params))
            base = f"{prefix}.{kind}" if prefix else kind
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}{i}"
        used.add(name)
        space_of[name] = leaf
        modules = tuple(sorted({p.rsplit(".", 1)[0] for p in params}))
        groups.append(Group(name, kind, units, exact=leaf not in sp.inexact, modules=modules))
    groups.sort(key=lambda g: _natural_key(g.name))
    return groups, space_of


def _natural_key(name: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.replace(".", " ").split()]


def build_graph(model: nn.Module, example_inputs: tuple, traced: Traced | None = None) -> DependencyGraph:
    """Trace `model` (unless `traced` is given) and return its dependency graph with the prunable groups."""
    traced = traced or trace(model, example_inputs)
    ids = {n: id(t) for n, t in model.named_parameters(remove_duplicate=False)}
    ids.update({n: id(t) for n, t in model.named_buffers(remove_duplicate=False)})
    b = Builder(traced, _sliceable_buffers(model), ids)
    b.run()
    groups, space_of = extract_groups(model, b)
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    shapes.update({n: t.shape for n, t in model.named_buffers(remove_duplicate=False)})
    return DependencyGraph(traced, b.spaces, b.dims, b.links, groups, b.sites, b.repeats, shapes, b.unknown_ops,
                           space_of)
