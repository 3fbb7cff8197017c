"""Propagation rules: one function per ATen op family, linking the index spaces of inputs and outputs.

A rule gets the `Builder` (which owns the spaces and the dims of every tensor), the fx node and its tensor
arguments' dims, and returns the dims of the node's output.  An op without a rule freezes every dimension it
touches: unknown ops are never assumed element-wise.
"""
from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .graph import Builder

aten = torch.ops.aten
Dims = list[int]  # one space id per tensor dimension

RULES: dict[object, Callable] = {}


def rule(*targets):
    def register(fn):
        for t in targets:
            RULES[t] = fn
        return fn

    return register


def _packets(*names: str) -> list:
    out = []
    for n in names:
        packet = getattr(aten, n, None)
        if packet is not None:
            out.extend(getattr(packet, o) for o in packet.overloads())
    return out


def _norm(d: int, n: int) -> int:
    return d + n if d < 0 else d


# -- element-wise and broadcasting ------------------------------------------------------------------
ELEMENTWISE = _packets(
    "add", "sub", "mul", "div", "neg", "relu", "gelu", "silu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt",
    "pow", "abs", "clone", "alias", "detach", "contiguous", "_to_copy", "to", "type_as", "dropout", "where",
    "clamp", "clamp_min", "clamp_max", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "erf",
    "reciprocal", "square", "masked_fill", "lift_fresh_copy", "_assert_tensor_metadata", "sin", "cos",
    "native_dropout", "gelu_", "relu_", "silu_", "add_", "mul_", "copy", "log_sigmoid", "softplus", "mish",
    "logical_not", "eq", "ne", "lt", "le", "gt", "ge", "bitwise_and", "bitwise_or", "__and__", "__or__",
    "minimum", "maximum", "sign", "floor", "ceil", "round", "trunc", "sigmoid_", "tanh_", "expm1", "log1p",
    "hardswish_", "hardsigmoid_", "hardtanh_", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout",
    "div_", "sub_", "clamp_", "clamp_min_", "gelu_",
)


@rule(*ELEMENTWISE)
def elementwise(b: "Builder", node, args: list[Dims | None]) -> Dims | None:
    """Right-aligned broadcasting: equal sizes are the same index space; size-1 dims broadcast."""
    shape = b.shape(node)
    if shape is None:
        return None
    out = b.fresh(node)
    for a, arg in zip(args, node.args):
        if a is None:
            continue
        ashape = b.shape(arg)
        for k in range(1, len(ashape) + 1):
            if ashape[-k] == shape[-k] and shape[-k] != 1:
                b.union(a[-k], out[-k], node)
    return out


# -- reductions --------------------------------------------------------------------------------------
def _reduce(b: "Builder", node, args, dims, keepdim: bool, exact: bool) -> Dims:
    (x,) = [a for a in args if a is not None][:1]
    n = len(x)
    reduced = {_norm(d, n) for d in dims} if dims else set(range(n))
    for d in reduced:
        (b.spaces.mark_inexact if not exact else (lambda *_: None))(x[d])
    out = b.fresh(node)
    j = 0
    for d in range(n):
        if d in reduced:
            j += keepdim
            continue
        b.union(x[d], out[j], node)
        j += 1
    return out


@rule(*_packets("sum"))
def reduce_sum(b, node, args):
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return _reduce(b, node, args, list(dims) if dims is not None else None, keep, exact=True)


@rule(*_packets("mean", "var", "std", "var_mean"))
def reduce_mean(b, node, args):
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else node.kwargs.get("keepdim", False)
    if isinstance(dims, int):
        dims = [dims]
    return _reduce(b, node, args, list(dims) if dims is not None else None, keep, exact=False)


@rule(*_packets("_softmax", "softmax", "_log_softmax", "log_softmax"))
def softmax(b, node, args):
    x = args[0]
    d = _norm(node.args[1], len(x))
    b.spaces.mark_inexact(x[d])
    out = b.fresh(node)
    for i in range(len(x)):
        b.union(x[i], out[i], node)
    return out


# -- normalisation layers ----------------------------------------------------------------------------
@rule(*_packets("layer_norm", "native_layer_norm"))
def layer_norm(b, node, args):
    x, weight, bias = (args + [None, None, None])[0], (args + [None] * 4)[2], (args + [None] * 4)[3]
    k = len(node.args[1])
    y = b.fresh(node, index=0 if node.target is not aten.layer_norm.default else None)
    for i in range(len(x)):
        b.union(x[i], y[i], node)
    for i in range(len(x) - k, len(x)):
        b.spaces.mark_inexact(x[i])
    for p in (weight, bias):
        if p is not None:
            for j in range(k):
                b.union(p[j], x[len(x) - k + j], node)
    if node.target is aten.layer_norm.default:
        return y
    stats = [b.fresh(node, index=i) for i in (1, 2)]
    return [y, *stats]


@rule(*_packets("rms_norm", "_fused_rms_norm"))
def rms_norm(b, node, args):
    x, weight = args[0], (args + [None] * 3)[2]
    k = len(node.args[1])
    multi = isinstance(node.meta.get("val"), (tuple, list))
    y = b.fresh(node, index=0 if multi else None)
    for i in range(len(x)):
        b.union(x[i], y[i], node)
    for i in range(len(x) - k, len(x)):
        b.spaces.mark_inexact(x[i])
    if weight is not None:
        for j in range(k):
            b.union(weight[j], x[len(x) - k + j], node)
    if multi:
        return [y] + [b.fresh(node, index=i) for i in range(1, len(node.meta["val"]))]
    return y


BATCH_NORMS = _packets("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
                       "batch_norm", "_native_batch_norm_legit_functional", "cudnn_batch_norm")


@rule(*BATCH_NORMS)
def batch_norm(b, node, args):
    """Per-channel affine on dim 1: weight, bias, running mean and variance all share the channel space."""
    x = args[0]
    multi = isinstance(node.meta.get("val"), (tuple, list))
    y = b.fresh(node, index=0 if multi else None)
    for i in range(len(x)):
        b.union(x[i], y[i], node)
    for p in args[1:5]:
        if p is not None and len(p) == 1:
            b.union(p[0], x[1], node)
    if multi:
        return [y] + [b.fresh(node, index=i) for i in range(1, len(node.meta["val"]))]
    return y


POOLS = _packets("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d",
                 "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                 "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d")


@rule(*POOLS)
def pool(b, node, args):
    """Pooling acts on each channel alone: the leading dims (batch, channels) pass through, the pooled
    spatial dims are new (their sizes come from the window); with_indices variants return (values, indices)."""
    x = args[0]
    multi = isinstance(node.meta.get("val"), (tuple, list))
    outs = [b.fresh(node, index=i) for i in range(len(node.meta["val"]))] if multi else [b.fresh(node)]
    spatial = len(node.args[1]) if isinstance(node.args[1], (list, tuple)) else 1
    lead = len(x) - spatial
    for out in outs:
        for i in range(lead):
            b.union(x[i], out[i], node)
        for d in out[lead:]:
            b.freeze(d, node, "pooled spatial dimension")
    for d in x[lead:]:
        b.freeze(d, node, "pooled spatial dimension")
    return outs if multi else outs[0]


# -- layers with parameters --------------------------------------------------------------------------
@rule(aten.linear.default)
def linear(b, node, args):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    out = b.fresh(node)
    for i in range(len(x) - 1):
        b.union(x[i], out[i], node)
    b.union(x[-1], w[1], node)
    b.union(out[-1], w[0], node)
    if bias is not None:
        b.union(bias[0], w[0], node)
    return out


def _matmul(b, node, a: Dims, c: Dims, out: Dims) -> None:
    """a [..., n, k] @ c [..., k, m] -> out [..., n, m]; 1-D operands as in torch.matmul."""
    if len(a) >= 2 and len(c) >= 2:
        b.union(a[-1], c[-2], node)
        b.union(a[-2], out[-2], node)
        b.union(c[-1], out[-1], node)
        for k in range(3, len(out) + 1):
            for op in (a, c):
                if len(op) >= k and b.size(op[-k]) == b.size(out[-k]) != 1:
                    b.union(op[-k], out[-k], node)
    elif len(a) == 1 and len(c) >= 2:
        b.union(a[0], c[-2], node)
    elif len(c) == 1 and len(a) >= 2:
        b.union(a[-1], c[0], node)
    else:
        b.union(a[0], c[0], node)


@rule(*_packets("mm", "bmm", "matmul"))
def matmul(b, node, args):
    a, c = args[0], args[1]
    out = b.fresh(node)
    _matmul(b, node, a, c, out)
    if not (b.from_param(node.args[0]) or b.from_param(node.args[1])):
        # An activation × activation product (attention scores, attention × values): the matrix dims are
        # inner dims of heads, bound to a per-module head_dim attribute; keep them whole.
        for op in (a, c, out):
            for d in op[-2:]:
                b.freeze(d, node, "activation matmul")
        if len(out) >= 4:
            b.attention_site(node, out[-3])
    return out


@rule(*_packets("addmm", "baddbmm"))
def addmm(b, node, args):
    bias, a, c = args[0], args[1], args[2]
    out = b.fresh(node)
    _matmul(b, node, a, c, out)
    if bias is not None:
        shape = b.shape(node.args[0])
        for k in range(1, len(bias) + 1):
            if shape[-k] != 1:
                b.union(bias[-k], out[-k], node)
    return out


@rule(*_packets("convolution", "conv1d", "conv2d", "conv3d", "_convolution"))
def convolution(b, node, args):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    if node.target in _packets("convolution", "_convolution"):
        transposed, groups = node.args[6], node.args[8]
    else:
        transposed = False
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    out = b.fresh(node)
    b.union(x[0], out[0], node)
    for d in out[2:]:
        b.freeze(d, node, "spatial dimension")
    cin = b.shape(node.args[0])[1]
    if transposed:
        b.freeze_all([x, w, out, bias], node, "transposed convolution")
        return out
    if groups == 1:
        b.union(x[1], w[1], node)
        b.union(out[1], w[0], node)
    elif groups == cin and b.shape(node.args[1])[1] == 1 and b.shape(node)[1] == cin:
        b.union(x[1], out[1], node)  # depthwise: channel c in, channel c out
        b.union(out[1], w[0], node)
    else:
        b.freeze_all([x, w, out, bias], node, f"grouped convolution (groups={groups})")
        return out
    if bias is not None:
        b.union(bias[0], out[1], node)
    for d in w[2:]:
        b.freeze(d, node, "kernel dimension")
    return out


@rule(aten.embedding.default)
def embedding(b, node, args):
    w, idx = args[0], args[1]
    out = b.fresh(node)
    b.freeze(w[0], node, "embedding rows are looked up by token id")
    for i in range(len(idx)):
        b.union(idx[i], out[i], node)
    b.union(w[1], out[-1], node)
    return out


@rule(*_packets("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"))
def attention(b, node, args):
    """q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] -> [B, H, Lq, Dv]: heads are shared, D is kept whole."""
    q, k, v = args[:3]
    multi = isinstance(node.meta.get("val"), (tuple, list))
    out = b.fresh(node, index=0 if multi else None)
    for i in range(len(q) - 2):
        b.union(q[i], out[i], node)
        for other in (k, v):
            nq, nk = b.size(q[i]), b.size(other[i])
            if nk == nq:
                b.union(other[i], q[i], node)
            elif nk > 1 and nq % nk == 0 and i == len(q) - 3:  # enable_gqa: query head = kv head × group
                b.union(b.spaces.refine(q[i], "prod", [nk, nq // nk])[0], other[i], node)
    b.union(k[-2], v[-2], node)
    b.union(q[-2], out[-2], node)
    b.union(q[-1], k[-1], node)
    b.union(v[-1], out[-1], node)
    for d in (q[-1], v[-1], q[-2], k[-2]):
        b.freeze(d, node, "inside-head dimension")
    if len(args) > 3 and args[3] is not None:
        mask = args[3]
        mshape = b.shape(node.args[3])
        for kk in range(1, len(mask) + 1):
            if mshape[-kk] != 1:
                b.union(mask[-kk], (k[-2] if kk == 1 else out[-kk]), node)
    b.attention_site(node, q[-3] if len(q) >= 3 else None)
    if multi:
        return [out] + [b.fresh(node, index=i) for i in range(1, len(node.meta["val"]))]
    return out


# -- shape ops ---------------------------------------------------------------------------------------
def _groups(src: list[int], dst: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair consecutive runs of dims with equal products (size-1 dims dropped); None if impossible."""
    si = [i for i, s in enumerate(src) if s != 1]
    di = [i for i, s in enumerate(dst) if s != 1]
    out, i, j = [], 0, 0
    while i < len(si) or j < len(di):
        gs, gd = [], []
        ps = pd = 1
        while True:
            if ps <= pd and i < len(si):
                gs.append(si[i]); ps *= src[si[i]]; i += 1
            elif j < len(di):
                gd.append(di[j]); pd *= dst[di[j]]; j += 1
            else:
                return None
            if ps == pd and gs and gd:
                break
        out.append((gs, gd))
    return out


@rule(*_packets("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten",
                "expand_copy", "view_copy", "_reshape_alias"))
def reshape(b, node, args):
    x = args[0]
    src, dst = list(b.shape(node.args[0])), list(b.shape(node))
    out = b.fresh(node)
    pairs = _groups(src, dst)
    if pairs is None:
        b.freeze_all([x, out], node, "reshape without a matching factorisation")
        return out
    for gs, gd in pairs:
        if len(gs) == 1 and len(gd) == 1:
            b.union(x[gs[0]], out[gd[0]], node)
        elif len(gs) == 1:
            kids = b.spaces.refine(x[gs[0]], "prod", [dst[d] for d in gd])
            b.link(kids, [out[d] for d in gd] + ([] if kids else [x[gs[0]]]), node)
        elif len(gd) == 1:
            kids = b.spaces.refine(out[gd[0]], "prod", [src[d] for d in gs])
            b.link(kids, [x[d] for d in gs] + ([] if kids else [out[gd[0]]]), node)
        else:
            whole = b.spaces.new(math.prod(src[d] for d in gs))
            b.link(b.spaces.refine(whole, "prod", [src[d] for d in gs]), [x[d] for d in gs], node)
            b.link(b.spaces.refine(whole, "prod", [dst[d] for d in gd]), [out[d] for d in gd], node)
    return out


@rule(*_packets("transpose", "t", "permute", "numpy_T", "swapaxes"))
def permute(b, node, args):
    x = args[0]
    n = len(x)
    if node.target in _packets("permute"):
        order = [_norm(d, n) for d in node.args[1]]
    elif node.target in _packets("t", "numpy_T"):
        order = list(reversed(range(n)))
    else:
        d0, d1 = _norm(node.args[1], n), _norm(node.args[2], n)
        order = list(range(n))
        order[d0], order[d1] = order[d1], order[d0]
    out = b.fresh(node)
    for i, src in enumerate(order):
        b.union(x[src], out[i], node)
    return out


@rule(*_packets("expand"))
def expand(b, node, args):
    """Broadcast size-1 dims to a new size (the KV heads of grouped-query attention gain a repeat dim here)."""
    x = args[0]
    src, dst = b.shape(node.args[0]), b.shape(node)
    out = b.fresh(node)
    off = len(dst) - len(src)
    for i in range(len(src)):
        if src[i] == dst[i + off]:
            b.union(x[i], out[i + off], node)
        else:
            b.repeats.append(out[i + off])
    return out


@rule(*_packets("repeat"))
def repeat(b, node, args):
    x = args[0]
    reps = list(node.args[1])
    src, dst = b.shape(node.args[0]), b.shape(node)
    out = b.fresh(node)
    off = len(dst) - len(src)
    for i in range(len(src)):
        r = reps[i + off]
        if r == 1:
            b.union(x[i], out[i + off], node)
        elif src[i] != 1:
            kids = b.spaces.refine(out[i + off], "prod", [r, src[i]])
            b.union(kids[1], x[i], node)
            b.repeats.append(kids[0])
    return out


@rule(*_packets("cat", "concat"))
def cat(b, node, args):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = b.fresh(node)
    n = len(out)
    dim = _norm(dim, n)
    parts = [(b.dims_of(t), b.shape(t)) for t in tensors]
    parts = [(d, s) for d, s in parts if d is not None and len(s) == n and s[dim] > 0]
    for d, s in parts:
        for i in range(n):
            if i != dim:
                b.union(d[i], out[i], node)
    kids = b.spaces.refine(out[dim], "cat", [s[dim] for _, s in parts])
    b.link(kids, [d[dim] for d, _ in parts] + ([] if kids else [out[dim]]), node)
    return out


@rule(*_packets("split", "split_with_sizes", "chunk", "unsafe_split", "split_copy", "split_with_sizes_copy",
                "unbind"))
def split(b, node, args):
    x = args[0]
    vals = node.meta["val"]
    n = len(x)
    if node.target in _packets("unbind"):
        dim = _norm(node.args[1] if len(node.args) > 1 else 0, n)
        b.freeze(x[dim], node, "unbind")
        return [[x[i] for i in range(n) if i != dim] for _ in vals]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = _norm(dim, n)
    sizes = [v.shape[dim] for v in vals]
    kids = b.spaces.refine(x[dim], "cat", [s for s in sizes if s > 0])
    outs, it = [], iter(kids)
    for v in vals:
        dims = [x[i] for i in range(n)]
        dims[dim] = next(it) if v.shape[dim] > 0 else b.spaces.new(0)
        outs.append(dims)
    return outs


@rule(*_packets("slice", "slice_copy", "narrow"))
def slice_(b, node, args):
    x = args[0]
    n = len(x)
    size_in = b.shape(node.args[0])
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, n)
    out = b.fresh(node)
    for i in range(n):
        if i != dim:
            b.union(x[i], out[i], node)
    if node.target in _packets("narrow"):
        start, length, step = node.args[2], node.args[3], 1
    else:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size_in[dim]
        step = node.args[4] if len(node.args) > 4 else 1
        start = max(0, start + size_in[dim] if start < 0 else start)
        end = min(size_in[dim], end + size_in[dim] if end < 0 else end)
        length = max(0, end - start)
    if step == 1 and length == size_in[dim]:
        b.union(x[dim], out[dim], node)
    elif step == 1 and length > 0:
        pieces = [s for s in (start, length, size_in[dim] - start - length) if s > 0]
        kids = b.spaces.refine(x[dim], "cat", pieces)
        b.union(kids[1 if start > 0 else 0], out[dim], node)
    else:
        b.freeze(x[dim], node, "strided slice")
        b.freeze(out[dim], node, "strided slice")
    return out


@rule(*_packets("select", "select_copy"))
def select(b, node, args):
    """x.select(dim, i): the dim splits into [before, the selected index, after]; the selected index is
    frozen, and so is the side `i` counts from (a literal position: removing an index there would move it),
    while the other side stays free (Falcon's `grouped[..., :-2, :]` queries beside `grouped[..., -2, :]`)."""
    x = args[0]
    n = len(x)
    dim = _norm(node.args[1], n)
    size = b.shape(node.args[0])[dim]
    index = node.args[2]
    pos = index + size if index < 0 else index
    pieces = [(s, k) for s, k in ((pos, "before"), (1, "at"), (size - pos - 1, "after")) if s > 0]
    kids = b.spaces.refine(x[dim], "cat", [s for s, _ in pieces])
    counted_from = "after" if index < 0 else "before"
    for kid, (_, kind) in zip(kids or [x[dim]], pieces if kids else [(size, "at")]):
        if kind in ("at", counted_from):
            b.freeze(kid, node, "select by position")
    return [x[i] for i in range(n) if i != dim]


@rule(*_packets("stack"))
def stack(b, node, args):
    """torch.stack(tensors, dim): the inputs' dims are one another's; the new dim (one per tensor) is frozen."""
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = b.fresh(node)
    dim = _norm(dim, len(out))
    b.freeze(out[dim], node, "stacked dimension")
    rest = [i for i in range(len(out)) if i != dim]
    for t in tensors:
        d = b.dims_of(t)
        if d is not None:
            for i, o in zip(range(len(d)), rest):
                b.union(d[i], out[o], node)
    return out


@rule(aten.index.Tensor)
def index(b, node, args):
    """x[i0, i1, ...] with index tensors: the indexed dims are looked up by value (frozen); the others pass
    through.  Adjacent indexed dims are replaced in place by the broadcast index shape, else it goes first."""
    x = args[0]
    indices = list(node.args[1])
    indexed = [i for i, t in enumerate(indices) if t is not None]
    out = b.fresh(node)
    for i in indexed:
        b.freeze(x[i], node, "indexed by value")
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    k = len(out) - (len(x) - len(indexed))  # dims of the broadcast index shape
    start = indexed[0] if adjacent else 0
    for d in out[start:start + k]:
        b.freeze(d, node, "indexed by value")
    rest = [i for i in range(len(x)) if i not in indexed]
    places = [o for o in range(len(out)) if not start <= o < start + k]
    for i, o in zip(rest, places):
        b.union(x[i], out[o], node)
    return out


@rule(*_packets("constant_pad_nd", "pad", "reflection_pad2d", "replicate_pad2d"))
def pad(b, node, args):
    """pad = (last dim's left, right, the dim before's left, right, ...): a dim padded by (0, 0) passes through
    (Swin pads height and width, not channels); a padded dim is frozen."""
    x = args[0]
    out = b.fresh(node)
    amounts = list(node.args[1])
    for i in range(len(x)):
        k = len(x) - 1 - i  # pairs count from the last dim
        if 2 * k + 1 < len(amounts) and (amounts[2 * k] or amounts[2 * k + 1]):
            b.freeze(x[i], node, "padded dimension")
            b.freeze(out[i], node, "padded dimension")
        else:
            b.union(x[i], out[i], node)
    return out


@rule(*_packets("repeat_interleave"))
def repeat_interleave(b, node, args):
    """x.repeat_interleave(r, dim): each index of `dim` repeated r times (frozen); other dims pass through."""
    x = args[0]
    out = b.fresh(node)
    if x is None or len(node.args) < 3 or node.args[2] is None:
        for d in out:
            b.freeze(d, node, "repeat_interleave")
        return out
    dim = _norm(node.args[2], len(x))
    for i in range(len(x)):
        if i == dim:
            b.freeze(x[i], node, "repeat_interleave")
            b.freeze(out[i], node, "repeat_interleave")
        else:
            b.union(x[i], out[i], node)
    return out


@rule(operator.getitem)
def getitem(b, node, args):
    dims = b.dims_of(node.args[0], whole=True)
    if dims is None or not isinstance(dims, list) or not dims or not isinstance(dims[0], list):
        return b.fresh_frozen(node, "getitem on an unknown value")
    return dims[node.args[1]]


@rule(*_packets("arange", "zeros", "ones", "full", "empty", "new_ones", "new_zeros", "new_full", "new_empty",
                "scalar_tensor", "zeros_like", "ones_like", "full_like", "empty_like", "rand", "randn", "tensor",
                "_local_scalar_dense", "sym_size", "lift_fresh_copy_default"))
def constant(b, node, args):
    """Tensors made from sizes or literals: their dims cannot change, so they are frozen."""
    return b.fresh_frozen(node, "constant")
