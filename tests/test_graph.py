"""Dependency graph and rewrite on hand-built and Hugging Face architectures: pruned == masked."""
from __future__ import annotations

import copy

import pytest
import torch

from surgeon_fx.passes.rewrite import RewriteError, mask, removed_indices, shrink
from surgeon_fx.graph import build_graph
from tests.archs import TinyCNN, TinyMLP, TinyTransformer, TinyViT, TransformerSpec, randomize_batchnorm


def forward(model, x):
    out = model(input_ids=x, use_cache=False) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_drop(graph, removed) -> int:
    total = 0
    for name, dims in removed_indices(graph, removed).items():
        if name not in dict(graph.traced.params.items()).values():
            continue
        shape = graph.param_shapes[name]
        kept = 1
        for d, n in enumerate(shape):
            kept *= n - (len(dims[d]) if d in dims else 0)
        total += int(torch.tensor(shape).prod()) - kept
    return total


def check_pruned_equals_masked(model, x, removed, graph=None, atol=1e-5):
    """Shrink a copy, mask another copy, compare outputs (in float64, so that float32 summation order over
    different widths cannot hide or fake a difference) and parameter counts; returns the shrunk model."""
    graph = graph or build_graph(model, (x,))
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    mask(masked, graph, removed)
    before = n_params(pruned)
    shrink(pruned, graph, removed)
    x64 = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        a, b = forward(copy.deepcopy(masked).double(), x64), forward(copy.deepcopy(pruned).double(), x64)
    scale = a.abs().max().clamp_min(1e-6)
    assert ((a - b).abs().max() / scale) < atol, f"pruned differs from masked by {(a - b).abs().max()}"
    assert before - n_params(pruned) == expected_drop(graph, removed)
    return pruned


def one_of_each(graph, exact_only=True):
    return {g.name: [g.size - 1] for g in graph.groups if g.exact or not exact_only}


def test_mlp_groups_are_hidden_neurons():
    torch.manual_seed(0)
    m = TinyMLP((6, 9, 7, 4)).eval()
    x = torch.randn(3, 6)
    g = build_graph(m, (x,))
    assert sorted((gr.size, gr.kind) for gr in g.groups) == [(7, "neurons"), (9, "neurons")]
    check_pruned_equals_masked(m, x, {g.groups[0].name: [0, 3], g.groups[1].name: [1]}, g)


def test_cnn_with_batchnorm_residual_and_depthwise():
    torch.manual_seed(0)
    m = randomize_batchnorm(TinyCNN(width=8, mid=6, depth=2))
    x = torch.randn(2, 3, 8, 8)
    g = build_graph(m, (x,))
    kinds = sorted((gr.size, gr.kind) for gr in g.groups)
    # one residual channel group (stem, both blocks' outputs, depthwise conv, classifier) + two inner widths
    assert kinds == [(6, "channels"), (6, "channels"), (8, "channels")]
    residual = max(g.groups, key=lambda gr: gr.size)
    params = residual.params()
    assert {"stem.weight", "bn.running_mean", "dw.weight", "fc.weight", "blocks.1.c2.weight"} <= params
    assert all(gr.exact for gr in g.groups)
    pruned = check_pruned_equals_masked(m, x, {gr.name: [0, 2] for gr in g.groups}, g)
    assert pruned.dw.groups == 6 and pruned.bn.num_features == 6 and pruned.fc.in_features == 6


def test_vit_encoder():
    torch.manual_seed(0)
    m = TinyViT().eval()
    x = torch.randn(2, 3, 8, 8)
    g = build_graph(m, (x,))
    by_kind = {}
    for gr in g.groups:
        by_kind.setdefault(gr.kind, []).append(gr)
    assert len(by_kind["heads"]) == 2 and all(gr.size == 4 for gr in by_kind["heads"])
    assert len(by_kind["neurons"]) == 2
    (residual,) = [gr for gr in g.groups if {"cls", "pos", "patch.weight"} <= gr.params()]
    assert residual.size == 16 and not residual.exact
    check_pruned_equals_masked(m, x, one_of_each(g), g)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("mlp", ["gated", "plain"])
def test_transformer_gqa_structure(attention, mlp):
    torch.manual_seed(0)
    spec = TransformerSpec(kv_heads=2, rep=3, attention=attention, mlp=mlp)
    m = TinyTransformer(spec).eval()
    x = torch.randint(0, spec.vocab, (2, 5))
    g = build_graph(m, (x,))
    kinds = sorted((gr.kind, gr.size) for gr in g.groups)
    assert kinds.count(("kv_heads", 2)) == 2 and kinds.count(("heads", 3)) == 2
    assert kinds.count(("neurons", spec.ffn)) == 2 and ("residual", spec.width) in kinds
    kv = g.group("blocks.0.attn.kv_heads")
    slices = {s.param: s.index.tolist() for s in kv.units[1].slices}
    hd = spec.head_dim
    assert slices["blocks.0.attn.k.weight"] == list(range(hd, 2 * hd))
    assert slices["blocks.0.attn.q.weight"] == list(range(3 * hd, 6 * hd))  # query heads 3, 4, 5
    pruned = check_pruned_equals_masked(m, x, one_of_each(g), g)
    assert pruned.blocks[0].attn.k.out_features == hd and pruned.blocks[0].attn.q.out_features == 2 * hd


def test_removing_nothing_is_bit_identical():
    torch.manual_seed(0)
    spec = TransformerSpec()
    m = TinyTransformer(spec).eval()
    x = torch.randint(0, spec.vocab, (1, 6))
    g = build_graph(m, (x,))
    pruned = copy.deepcopy(m)
    shrink(pruned, g, {gr.name: [] for gr in g.groups})
    with torch.no_grad():
        assert torch.equal(m(x), pruned(x))


def test_residual_through_norm_is_marked_inexact_but_shrinks():
    torch.manual_seed(0)
    spec = TransformerSpec(norm="layer")
    m = TinyTransformer(spec).eval()
    x = torch.randint(0, spec.vocab, (1, 6))
    g = build_graph(m, (x,))
    (res,) = [gr for gr in g.groups if gr.kind == "residual"]
    assert not res.exact
    pruned = copy.deepcopy(m)
    shrink(pruned, g, {res.name: [0, 5]})
    assert pruned.embed.embedding_dim == spec.width - 2
    assert pruned.blocks[1].n2.normalized_shape == (spec.width - 2,)
    assert torch.isfinite(pruned(x)).all()


def test_residual_without_norm_is_exact():
    torch.manual_seed(0)
    spec = TransformerSpec(norm="none")
    m = TinyTransformer(spec).eval()
    x = torch.randint(0, spec.vocab, (1, 6))
    g = build_graph(m, (x,))
    (res,) = [gr for gr in g.groups if gr.kind == "residual"]
    assert res.exact
    check_pruned_equals_masked(m, x, {res.name: [1, 2, 7]}, g)


def test_unknown_op_freezes_instead_of_guessing():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=-1))  # cumsum mixes features: no rule

    g = build_graph(Odd().eval(), (torch.randn(2, 4),))
    assert g.groups == []
    assert "frozen" in g.explain("a.weight", 0) and "cumsum" in g.explain("a.weight", 0)


def test_invalid_removals_are_rejected():
    m = TinyMLP((6, 9, 4)).eval()
    g = build_graph(m, (torch.randn(1, 6),))
    name = g.groups[0].name
    with pytest.raises(RewriteError, match="unknown group"):
        removed_indices(g, {"nope": [0]})
    with pytest.raises(RewriteError, match="out of range"):
        removed_indices(g, {name: [9]})
    with pytest.raises(RewriteError, match="fewer than"):
        removed_indices(g, {name: list(range(9))})


def test_describe_names_modules():
    spec = TransformerSpec(kv_heads=2, rep=2)
    g = build_graph(TinyTransformer(spec).eval(), (torch.randint(0, spec.vocab, (1, 4)),))
    text = g.describe()
    assert "blocks.1.attn.kv_heads: 2 kv_heads" in text
    assert "4 query heads = 2 KV heads × 2 query heads each" in text


def test_why_coupled_walks_the_op_chain():
    m = TinyMLP((6, 9, 4)).eval()
    g = build_graph(m, (torch.randn(2, 6),))
    chain = g.why_coupled(("layers.0.weight", 0), ("layers.1.weight", 1))
    assert chain and any("relu" in step for step in chain) and any("linear" in step for step in chain)
    assert g.why_coupled(("layers.0.weight", 0), ("layers.0.weight", 1)) == []
