"""Timing helpers: cases run on HF models (incl. a shrunk one with its KV cache), interleaving, MAC counts."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from surgeon_fx import speed
from surgeon_fx.graph import build_graph
from surgeon_fx.groups import Group
from surgeon_fx.hf import tiny_llama
from surgeon_fx.passes.rewrite import shrink  # noqa: I001
from surgeon_fx.passes.round_units import round_keep, with_multiple


@pytest.fixture(scope="module")
def dense_and_pruned():
    dense = tiny_llama()
    graph = build_graph(dense, (torch.randint(0, 128, (1, 8)),))
    removed = {g.name: [0] for g in graph.groups if g.kind in ("heads", "kv_heads")}
    removed.update({g.name: list(range(0, g.size, 2)) for g in graph.groups if g.kind == "neurons"})
    pruned = copy.deepcopy(dense)
    shrink(pruned, graph, removed)
    return dense, pruned


def test_cases_return_seconds_and_pruned_cache_decodes(dense_and_pruned):
    dense, pruned = dense_and_pruned
    for case in (speed.forward_case(2, 16), speed.prefill_case(2, 16), speed.decode_case(2, 8, 4)):
        for m in (dense, pruned):
            assert case(m) > 0


def test_decode_with_cache_matches_full_forward(dense_and_pruned):
    _, pruned = dense_and_pruned
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        full = pruned(input_ids=ids, use_cache=False).logits[:, -1]
        out = pruned(input_ids=ids[:, :9], use_cache=True)
        step = pruned(input_ids=ids[:, 9:], cache=out.cache, use_cache=True).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_interleaved_rotates_and_counts():
    calls = []

    def case(model):
        calls.append(model.tag)
        return float(model.tag)

    models = {}
    for tag in (1, 2, 3):
        m = nn.Linear(1, 1)
        m.tag = tag
        models[str(tag)] = m
    t = speed.interleaved(models, case, repeats=3, warmup=1)
    assert calls == [1, 2, 3, 1, 2, 3, 2, 3, 1, 3, 1, 2]
    assert t.seconds["2"] == [2.0] * 3 and t.median("3") == 3.0
    assert t.speedup("3", "1") == pytest.approx(1 / 3)


def test_macs_and_ideal(dense_and_pruned):
    dense, pruned = dense_and_pruned
    # tiny_llama: hidden 64, 4 heads × 16 (2 kv), FFN 96, vocab 128, 2 layers; lm_head tied.
    per_token = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96)
    assert speed.linear_macs(dense, 10) == 10 * (per_token + 64 * 128)
    assert speed.linear_macs(dense, 10, head_tokens=1) == 10 * per_token + 64 * 128
    assert speed.attention_width(dense) == [64, 64]
    assert speed.attention_macs(dense, 1, 3) == 2 * 2 * 64 * (1 + 2 + 3)
    assert speed.attention_macs(dense, 2, 1, past=4) == 2 * 2 * 64 * 2 * 5
    d, p = speed.case_macs(dense, 1, 16), speed.case_macs(pruned, 1, 16)
    assert d["matmul"] > d["linear"]
    ideal = speed.ideal_speedup(d, p)
    assert ideal["linear"] > 1 and ideal["matmul"] > 1
    dec = speed.decode_macs(dense, 1, 4, 2)
    assert dec["linear"] == 2 * speed.linear_macs(dense, 1)
    assert dec["matmul"] - dec["linear"] == speed.attention_macs(dense, 1, 1, 4) + speed.attention_macs(dense, 1, 1, 5)


def test_peak_memory_and_param_bytes(dense_and_pruned):
    dense, pruned = dense_and_pruned
    pm = speed.peak_memory(dense, speed.forward_case(1, 32))
    assert pm.peak >= pm.before > 0 and pm.kind.startswith("cpu")
    assert speed.param_bytes(pruned) < speed.param_bytes(dense)
    # parameters() lists the tied embedding / lm_head once, as param_bytes counts it
    assert speed.param_bytes(dense) == sum(p.numel() * 4 for p in dense.parameters()) + \
        sum(b.numel() * b.element_size() for b in dense.buffers())


def test_load_average():
    la = speed.load_average()
    assert la == [] or len(la) == 3


def test_set_multiple_and_round_keep():
    def group(kind, size):
        return Group(f"g{kind}{size}", kind, [None] * size)

    groups = [group("neurons", 1536), group("heads", 3), group("neurons", 12), group("residual", 576)]
    rounded = with_multiple(groups, 8)
    assert [g.multiple for g in rounded] == [8, 1, 1, 8]
    assert [g.multiple for g in groups] == [1, 1, 1, 1]  # the inputs are not changed
    assert round_keep(1254, 8, 1536) == 1256 and round_keep(1254, 64, 1536) == 1280
    assert round_keep(1050, 64, 1536) == 1024 and round_keep(3, 8, 1536) == 8
    assert round_keep(1600, 64, 1536) == 1536 and round_keep(1530, 64, 1540) == 1536
    with pytest.raises(ValueError):
        with_multiple(groups, 0)
