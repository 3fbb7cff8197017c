"""The real SmolLM2-135M (slow: loads the GGUF, traces the model): groups and pruned == masked logits."""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from surgeon_fx.hf import load_smollm2

    model, _ = load_smollm2()
    return model


def test_smollm2_graph_groups_and_shrink(smollm2):
    from surgeon_fx.passes.rewrite import mask, shrink
    from surgeon_fx.graph import build_graph

    model = smollm2
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    graph = build_graph(model, (ids,))
    layers = model.config.num_hidden_layers
    assert layers == 30
    by_kind = {}
    for g in graph.groups:
        by_kind.setdefault(g.kind, []).append(g)
    assert [g.size for g in by_kind["kv_heads"]] == [3] * layers
    assert [g.size for g in by_kind["heads"]] == [3] * layers  # 9 query heads = 3 kv heads × 3 each
    assert [g.size for g in by_kind["neurons"]] == [1536] * layers
    (res,) = by_kind["residual"]
    assert res.size == 576
    params = res.params()
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.29.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight", "model.layers.7.self_attn.q_proj.weight"} <= params
    assert sum(p.endswith("_proj.weight") for p in params) == 7 * layers
    assert "9 query heads = 3 KV heads × 3 query heads each" in graph.describe()

    removed = {}
    for g in by_kind["neurons"]:
        removed[g.name] = list(range(0, g.size, 5))[: int(0.2 * g.size)]
    for g in by_kind["kv_heads"]:
        removed[g.name] = [1]
    masked, pruned = copy.deepcopy(model), model
    mask(masked, graph, removed)
    plan = shrink(pruned, graph, removed)
    assert plan.config["num_key_value_heads"] == 2 and plan.config["num_attention_heads"] == 6
    assert plan.config["intermediate_size"] == 1536 - 307
    with torch.no_grad():
        a = masked(input_ids=ids, use_cache=False).logits
        b = pruned(input_ids=ids, use_cache=False).logits
    assert ((a - b).abs().max() / a.abs().max()) < 1e-5
