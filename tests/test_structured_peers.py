"""FLAP and Wanda-sp: targets met, removal through the same rewrite, bias compensation, determinism."""
import copy
from functools import lru_cache

import pytest
import torch

from surgeon_fx.evaluate import logits_of as _logits
from surgeon_fx.graph import build_graph
from surgeon_fx.hf import tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2
from surgeon_fx.groups import prunable_count, unit_sizes
from surgeon_fx.passes.consumers import kept_count
from surgeon_fx.passes.flap import flap, fluctuation, standardised
from surgeon_fx.passes.rewrite import apply_plan, shrink
from surgeon_fx.passes.sequential import InputStats
from surgeon_fx.passes.wanda_sp import unit_scores, wanda_sp

MODELS = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


@lru_cache(maxsize=None)
def _traced(arch: str):
    model = MODELS[arch](seed=0).double()
    windows = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(0))
    graph = build_graph(model, (windows[:1, :8],))
    return model, windows, graph, [g for g in graph.groups if g.exact]


def _setup(arch: str):
    """A fresh copy of the tiny model (float64), calibration windows [6, 24], its graph and exact groups."""
    model, windows, graph, groups = _traced(arch)
    return copy.deepcopy(model), windows, graph, groups


def logits_of(model, ids):
    with torch.no_grad():
        return _logits(model, ids)


def _prune(method: str, model, windows, groups, target, **kw):
    fn = flap if method == "flap" else wanda_sp
    return fn(model, windows, groups, target, **kw)


def test_input_stats_mean_and_sample_variance():
    x = torch.randn(3, 50, 7, generator=torch.Generator().manual_seed(0)) * 3 + 5
    stats = InputStats(False, torch.float64)
    for batch in x:
        stats.add(batch)
    flat = x.reshape(-1, 7).double()
    torch.testing.assert_close(stats.mean(), flat.mean(0))
    torch.testing.assert_close(stats.variance(), flat.var(0))  # unbiased, over all 150 tokens


def test_fluctuation_and_standardisation():
    W = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 0.0]])
    var = torch.tensor([2.0, 1.0, 0.5])
    assert fluctuation(W, var).tolist() == [4.0, 9.0, 2.0]  # Var(x_j) · ‖W[:, j]‖²
    scores = {"model.layers.0.o": torch.tensor([1.0, 2.0, 3.0]), "model.layers.1.o": torch.tensor([10.0, 30.0])}
    per_layer = standardised(scores, "layer")
    for s in per_layer.values():
        assert abs(float(s.mean())) < 1e-6 and abs(float(s.std()) - 1) < 1e-6
    per_kind = standardised(scores, "kind")  # both layers are one type: pooled mean 9.2
    assert float(per_kind["model.layers.0.o"][0]) < float(per_kind["model.layers.1.o"][0]) and \
        abs(float(torch.cat(list(per_kind.values())).mean())) < 1e-6


def test_wanda_sp_unit_score_sums_wanda_scores_of_its_columns():
    W = {"o": torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]])}
    norms = {"o": torch.tensor([2.0, 1.0, 3.0])}
    scores = unit_scores(W, norms, [{"o": torch.tensor([0, 2])}, {"o": torch.tensor([1])}])
    assert scores.tolist() == [2.0 + 0.0 + 1.5 + 3.0, 2.0 + 1.0]


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_kept_fraction_matches_target(method, arch):
    model, windows, _, groups = _setup(arch)
    target = 0.7
    removed = _prune(method, model, windows, groups, target)
    total, largest = prunable_count(model, groups), max(max(s) for s in unit_sizes(model, groups).values())
    kept = kept_count(model, groups, removed)
    assert abs(kept - target * total) <= largest  # within one unit of the target, either side
    assert any(removed.values())


def test_wanda_sp_is_uniform_over_blocks():
    model, windows, _, groups = _setup("llama")
    removed = wanda_sp(model, windows, groups, 0.75)
    sizes = unit_sizes(model, groups)
    for block in ("model.layers.0.", "model.layers.1."):
        mine = [g for g in groups if g.name.startswith(block)]
        total = prunable_count(model, mine)
        kept = kept_count(model, mine, removed)
        assert 0.75 * total - max(max(sizes[g.name]) for g in mine) <= kept <= 0.75 * total + 0.5


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2"])
def test_shrunk_model_equals_masked_one_and_reloads(method, arch):
    model, windows, graph, groups = _setup(arch)
    removed = _prune(method, model, windows, groups, 0.6)
    masked = logits_of(model, windows)  # the pass leaves the removed units zeroed
    dense_size = sum(p.numel() for p in model.parameters())
    plan = shrink(model, graph, removed)
    assert sum(p.numel() for p in model.parameters()) < dense_size
    torch.testing.assert_close(logits_of(model, windows), masked, rtol=1e-9, atol=1e-9)
    fresh = apply_plan(MODELS[arch](seed=1).double(), type(plan).from_json(plan.to_json()))
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(logits_of(fresh.eval(), windows), masked, rtol=1e-9, atol=1e-9)


def test_flap_adds_a_bias_to_consumers_without_one_and_the_plan_records_it():
    model, windows, graph, groups = _setup("llama")
    assert model.model.layers[0].mlp.down_proj.bias is None
    removed = flap(model, windows, groups, 0.6)
    plan = shrink(model, graph, removed)
    assert model.model.layers[0].mlp.down_proj.bias is not None
    assert "model.layers.0.mlp.down_proj.bias" in plan.added and plan.added["model.layers.0.mlp.down_proj.bias"] == [64]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_bias_compensation_reduces_output_error(arch):
    dense, windows, _, groups = _setup(arch)
    reference = logits_of(dense, windows)
    errors = {}
    for bias in (True, False):
        model = copy.deepcopy(dense)
        errors[bias] = (flap(model, windows, groups, 0.6, bias=bias), float((logits_of(model, windows) -
                                                                             reference).pow(2).mean()))
    assert errors[True][0] == errors[False][0]  # the same units, only the compensation differs
    assert errors[True][1] < 0.9 * errors[False][1]


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_deterministic(method):
    results = []
    for _ in range(2):
        model, windows, _, groups = _setup("llama")
        removed = _prune(method, model, windows, groups, 0.7)
        results.append((removed, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_flap_selection_is_global_and_kind_standardisation_differs():
    model, windows, _, groups = _setup("llama")
    per_layer = flap(copy.deepcopy(model), windows, groups, 0.6)
    fractions = {g.name: len(per_layer[g.name]) / g.size for g in groups if g.kind == "neurons"}
    assert len(set(fractions.values())) > 1 or any(per_layer[g.name] for g in groups if g.kind != "neurons")
    assert flap(copy.deepcopy(model), windows, groups, 0.6, standardise="kind") is not None
    with pytest.raises(ValueError, match="standardise"):
        flap(copy.deepcopy(model), windows, groups, 0.6, standardise="global")
