"""Issue 14: the coverage zoo (`tests/coverage_archs.py`) — every architecture traces, its groups shrink exactly
like masking, every weight dimension without a group has a reason — and a regression test for each failure the
zoo found."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from surgeon_fx.graph import Builder, build_graph
from surgeon_fx.passes.rewrite import ShrinkPlan, apply_plan, shrink
from surgeon_fx.trace import is_hf_causal_lm, trace
from tests.archs import TinyCNN, TinyTransformer, TransformerSpec, randomize_batchnorm
from tests.coverage_archs import ARCHS, check_graph, has_torchvision, shrink_vs_mask, spread_removal
from tests.test_graph import check_pruned_equals_masked

ZOO = [pytest.param(a, id=a.name, marks=[pytest.mark.slow] if a.slow else []) for a in ARCHS.values()]


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_architecture_groups_shrink_like_masking(arch):
    if arch.family == "torchvision" and not has_torchvision():
        pytest.skip("torchvision is not installed (pip install -e .[test])")
    row = check_graph(arch)
    found = {kind.removesuffix(" (inexact)") for kind in row["groups"]}
    assert arch.expect <= found, f"missing group kinds {arch.expect - found}: {row['unprunable']}"
    assert row["removed_units"] > 0 and row["shrink_vs_mask"] < 1e-10
    for line in row["unprunable"]:  # every dimension without a group says which op stops it
        assert "(" in line and "no free factor" not in line, line


# -- 1. linears written as x @ self.weight.T; Falcon ----------------------------------------------------
def test_matmul_weight_T_linears_group_like_nn_linear():
    torch.manual_seed(0)
    x = torch.randint(0, 17, (2, 5))
    kinds = {}
    for linear in ("module", "matmul"):
        model = TinyTransformer(TransformerSpec(linear=linear, fused=True)).eval()
        graph = build_graph(model, (x,))
        kinds[linear] = sorted((g.kind, g.size, g.exact) for g in graph.groups)
        check_pruned_equals_masked(model, x, spread_removal(graph), graph, atol=1e-10)
    assert kinds["matmul"] == kinds["module"] and ("kv_heads", 2, True) in kinds["matmul"]


class _ParamOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return x @ self.w.T, torch.cat([self.w, self.w]).sum(), self.w.sqrt().sum(), self.w.split(2)[0].sum()


def test_from_param_follows_view_ops_only():
    """The old substring test ("t." in the op name) also let cat, sqrt, split and select through."""
    traced = trace(_ParamOps(), (torch.randn(2, 3),))
    b = Builder(traced, set(), {})
    by_op = {getattr(n.target, "__name__", "").split(".")[0]: n for n in traced.graph.nodes if n.op == "call_function"}
    assert b.from_param(by_op["numpy_T"])
    for op in ("cat", "sqrt", "split"):
        assert not b.from_param(by_op[op]), op


def test_falcon_gqa_has_query_head_groups_and_keeps_its_derived_head_dim():
    model, inputs = ARCHS["falcon (new decoder, GQA)"].build()
    graph = build_graph(model, inputs)
    attn = "transformer.h.0.self_attention"
    assert graph.group(f"{attn}.kv_heads").size == 2 and graph.group(f"{attn}.heads").size == 2
    removed = {f"{attn}.kv_heads": [0], "transformer.h.1.self_attention.heads": [1]}
    assert shrink_vs_mask(model, inputs, graph, removed) < 1e-10
    head_dim = model.config.head_dim
    plan = shrink(model, graph, removed)  # FalconConfig.head_dim is a read-only property: hidden // heads
    assert "head_dim" not in plan.config and model.config.head_dim == head_dim
    assert "num_attention_heads" not in plan.config  # 2 heads would make FalconConfig.head_dim 16, not 8
    assert model.transformer.h[0].self_attention.num_kv_heads == 1


def test_layers_pruned_to_different_head_counts_read_their_own_config():
    """Phi-3 slices its fused qkv at `self.config.num_attention_heads * head_dim`: one layer losing heads must
    neither change the count the other layer reads nor keep the old one itself."""
    model, inputs = ARCHS["phi3 (fused qkv, gate_up)"].build()
    graph = build_graph(model, inputs)
    removed = {"model.layers.0.self_attn.heads": [0]}
    assert shrink_vs_mask(model, inputs, graph, removed) < 1e-10
    plan = shrink(model, graph, removed)
    layers = model.model.layers
    assert layers[0].self_attn.config.num_attention_heads == 2 and layers[1].self_attn.config.num_attention_heads == 4
    assert model.config.num_attention_heads == 4 and "num_attention_heads" not in plan.config
    fresh = apply_plan(ARCHS["phi3 (fused qkv, gate_up)"].build()[0], ShrinkPlan.from_json(json.loads(json.dumps(
        plan.to_json()))))  # what surgeon_fx.load does with the manifest's plan
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs).logits, model(*inputs).logits)


# -- 2. Hugging Face models that are not causal LMs ---------------------------------------------------------
BERT_FILE = '''
import torch
import transformers


def build():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM._from_config(cfg, attn_implementation="sdpa").eval()


def example_inputs():
    return (torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),)


def calibration(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (1, length), generator=g),) for _ in range(n)]


def loss(model, batch):
    ids = batch[0]
    return model(input_ids=ids, labels=ids).loss * ids.numel()
'''


def test_masked_lm_reloads_as_its_own_class(tmp_path):
    from transformers import BertForMaskedLM

    from surgeon_fx import load
    from surgeon_fx.cli import summary
    from surgeon_fx.compile import compile_model
    from surgeon_fx.hf import tiny_llama
    from surgeon_fx.modelfile import load_model_file
    from surgeon_fx.recipe import Recipe

    (tmp_path / "bert_mlm.py").write_text(BERT_FILE)
    mf = load_model_file(tmp_path / "bert_mlm.py")
    assert not is_hf_causal_lm(mf.build()) and is_hf_causal_lm(tiny_llama())
    result = compile_model(mf, Recipe(method="magnitude", target=0.8, shots=1), tmp_path / "out", progress=False)
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["source"]["model_class"] == "BertForMaskedLM" and manifest["hf"] == "hf"
    loaded = load(result.out)
    assert type(loaded) is BertForMaskedLM
    (ids,) = mf.example_inputs(loaded)
    with torch.no_grad():
        want = result.model(input_ids=ids, labels=ids)
        got = loaded(input_ids=ids, labels=ids)
        from_hf = BertForMaskedLM.from_pretrained(result.out / "hf").eval()(input_ids=ids)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)  # the masked-LM loss, not a shifted causal one
    torch.testing.assert_close(from_hf.logits, want.logits)
    assert "hf/         BertForMaskedLM.from_pretrained(" in summary(result)


# -- 3. adaptive average pooling ------------------------------------------------------------------------------
def test_adaptive_avg_pool_keeps_the_last_stage_channel_group():
    x = torch.randn(2, 3, 6, 6)
    groups = {}
    for pool in ("mean", "adaptive"):
        torch.manual_seed(0)
        model = randomize_batchnorm(TinyCNN(width=6, mid=4, pool=pool))
        graph = build_graph(model, (x,))
        groups[pool] = sorted((g.size, g.kind, g.exact) for g in graph.groups)
        assert not graph.unknown_ops
        check_pruned_equals_masked(model, x, {g.name: [0, g.size - 1] for g in graph.groups}, graph, atol=1e-10)
    assert groups["adaptive"] == groups["mean"]


# -- 4. explain on a dimension no group prunes -----------------------------------------------------------------
def test_explain_says_why_a_dimension_has_no_group():
    spec = TransformerSpec(kv_heads=1, rep=3)  # multi-query: the single kv head is no group
    graph = build_graph(TinyTransformer(spec).eval(), (torch.randint(0, spec.vocab, (1, 4)),))
    lines = {p: graph.explain(p, 0) for p in ("embed.weight", "head.weight", "blocks.0.attn.k.weight")}
    assert "embedding rows" in lines["embed.weight"] and "model output" in lines["head.weight"]
    assert "inside-head dimension" in lines["blocks.0.attn.k.weight"]
    assert all("group(s) []" not in line for line in lines.values())
    assert "is pruned by group(s) ['blocks.0.attn.heads']" in graph.explain("blocks.0.attn.q.weight", 0)


# -- shapes of patterns the zoo showed -------------------------------------------------------------------------
def test_reshape_conflict_freezes_both_sides():
    """ShuffleNet's channel shuffle views a concatenation [x1 | branch(x2)] as [2, C/2]: a cat split against a
    prod split.  Both sides must freeze (only the view's output did, so removing a branch channel broke the
    view)."""

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 5, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            y = y.view(y.shape[0], 2, 4, *y.shape[2:]).transpose(1, 2).reshape(y.shape)
            return self.c(y)

    x = torch.randn(2, 3, 4, 4)
    model = Shuffle().eval()
    graph = build_graph(model, (x,))
    assert graph.groups == [] and "incompatible reshape structure" in graph.explain("a.weight", 0)


def test_fixed_width_attention_modules_keep_their_heads():
    """nn.MultiheadAttention splits its packed projection by embed_dim: its heads cannot go."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.fc2(torch.relu(self.fc1(x)))

    model, x = Encoder().eval(), torch.randn(2, 5, 8)
    graph = build_graph(model, (x,))
    assert [g.kind for g in graph.groups] == ["neurons"]
    line = graph.explain("attn.in_proj_weight", 0)  # issue 14 item 4: it said "is pruned by group(s) []"
    assert line.startswith("attn.in_proj_weight[0] is not pruned by any group: ") and "MultiheadAttention" in line
    check_pruned_equals_masked(copy.deepcopy(model), x, {graph.groups[0].name: [1, 4]}, graph, atol=1e-10)
