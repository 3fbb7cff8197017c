"""Dependency graph and rewrite on tiny Hugging Face models built from configs (random weights)."""
from __future__ import annotations

import pytest
import torch

from surgeon_fx.graph import build_graph
from surgeon_fx.hf import tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2
from tests.archs import tiny_gemma
from tests.test_graph import check_pruned_equals_masked

BUILDERS = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2, "gemma": tiny_gemma}


def _kinds(graph):
    out = {}
    for g in graph.groups:
        out.setdefault(g.kind, []).append(g)
    return out


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_hf_groups_and_pruned_equals_masked(arch):
    model = BUILDERS[arch]()
    cfg = model.config
    layers = cfg.num_hidden_layers
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    graph = build_graph(model, (ids,))
    kinds = _kinds(graph)
    assert len(kinds["neurons"]) == layers
    assert len(kinds["residual"]) == 1 and kinds["residual"][0].size == cfg.hidden_size
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if 1 < kv < heads:
        assert [g.size for g in kinds["kv_heads"]] == [kv] * layers
        assert [g.size for g in kinds["heads"]] == [heads // kv] * layers
    elif kv == 1:  # multi-query: the single kv head stays, query heads are free
        assert "kv_heads" not in kinds and [g.size for g in kinds["heads"]] == [heads] * layers
    else:
        assert [g.size for g in kinds["heads"]] == [heads] * layers
    # remove one unit of every exact group (the residual crosses norms: inexact by design)
    removed = {g.name: [1] for g in graph.groups if g.exact}
    pruned = check_pruned_equals_masked(model, ids, removed, graph)
    # the pruned model re-exports, and its graph sees the new widths
    regraph = build_graph(pruned, (ids,))
    sizes = sorted(g.size for g in _kinds(regraph)["neurons"])
    assert sizes == sorted(g.size - 1 for g in kinds["neurons"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_residual_shrinks_and_runs(arch):
    model = BUILDERS[arch]()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    graph = build_graph(model, (ids,))
    (res,) = _kinds(graph)["residual"]
    from surgeon_fx.passes.rewrite import shrink

    plan = shrink(model, graph, {res.name: [0, 3]})
    emb = model.get_input_embeddings()
    assert emb.weight.shape[1] == res.size - 2
    assert model.get_output_embeddings().weight.shape[1] == res.size - 2
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is emb.weight
    assert plan.config.get("hidden_size", plan.config.get("n_embd")) == res.size - 2
    out = model(input_ids=ids, use_cache=False).logits
    assert out.shape == (1, 6, model.config.vocab_size) and torch.isfinite(out).all()
