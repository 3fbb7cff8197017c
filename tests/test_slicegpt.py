"""SliceGPT-style slicing on tiny Hugging Face models (random weights)."""
from __future__ import annotations

import copy

import pytest
import torch

from surgeon_fx.passes.slicegpt import SliceError, slice_residual
from surgeon_fx.graph import build_graph
from surgeon_fx.hf import tiny_llama, tiny_opt, tiny_qwen2
from tests.archs import tiny_gemma
from surgeon_fx.trace import LogitsOf

RMS_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma": tiny_gemma}  # tied, untied, (1 + w) norm


def _setup(build):
    model = build()
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (4, 24))
    return model, ids, build_graph(model, (ids[:1, :12],))


@pytest.mark.parametrize("arch", sorted(RMS_MODELS))
def test_full_width_rotation_keeps_the_function(arch):
    model, ids, graph = _setup(RMS_MODELS[arch])
    ref = model(ids).logits
    result = slice_residual(model, graph, ids, model.config.hidden_size)
    assert torch.allclose(model(ids).logits, ref, atol=1e-5, rtol=1e-4)
    assert all(abs(r - 1.0) < 1e-9 for r in result.kept_energy.values())
    # the weights did change: the rotation is not the identity
    assert not torch.allclose(model.get_submodule("model.embed_tokens").weight,
                              RMS_MODELS[arch]().get_submodule("model.embed_tokens").weight)


@pytest.mark.parametrize("arch", sorted(RMS_MODELS))
def test_sliced_model_is_smaller_and_runs(arch):
    model, ids, graph = _setup(RMS_MODELS[arch])
    dense = copy.deepcopy(model)
    d, width = model.config.hidden_size, model.config.hidden_size * 3 // 4
    result = slice_residual(model, graph, ids, width)
    assert model.config.hidden_size == width
    emb = model.get_input_embeddings().weight
    assert emb.shape == (model.config.vocab_size, width)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(("q_proj", "gate_proj")):
            assert mod.in_features == width
        if isinstance(mod, torch.nn.Linear) and name.endswith(("o_proj", "down_proj")):
            assert mod.out_features == width
    final = model.get_submodule("model.norm")
    if model.config.tie_word_embeddings:  # the final norm's scale cannot go into the tied head: a map follows
        assert isinstance(final, torch.nn.Sequential) and final[1].weight.shape == (width, width)
    else:
        assert not isinstance(final, torch.nn.Sequential)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    out = model(ids).logits
    assert out.shape == dense(ids).logits.shape and torch.isfinite(out).all()
    # PCA keeps at least the proportional share of the pooled energy (Ky Fan); per site it is a fraction
    assert all(0.0 < r <= 1.0 + 1e-9 for r in result.kept_energy.values())
    top = result.eigenvalues[:width].sum() / result.eigenvalues.sum()
    assert top >= width / d - 1e-9
    torch.export.export(LogitsOf(model), (ids[:1],), strict=False)


def test_pca_slicing_beats_plain_channel_deletion():
    """Slicing the principal directions changes the logits less than deleting the same number of raw channels."""
    model, ids, graph = _setup(tiny_llama)
    with torch.no_grad():  # give the residual stream a dominant low-dimensional part, as trained models have
        emb = model.get_input_embeddings().weight
        basis = torch.linalg.qr(torch.randn(emb.shape[1], emb.shape[1]))[0]
        emb.copy_(emb @ basis @ torch.diag(torch.linspace(3.0, 0.05, emb.shape[1])) @ basis.T)
    ref = model(ids).logits
    width = model.config.hidden_size // 2
    sliced = copy.deepcopy(model)
    slice_residual(sliced, graph, ids, width)
    from surgeon_fx.passes.rewrite import shrink
    plain = copy.deepcopy(model)
    group = [g for g in graph.groups if g.kind == "residual"][0]
    shrink(plain, graph, {group.name: list(range(width, group.size))})
    err_sliced = (sliced(ids).logits - ref).pow(2).mean()
    err_plain = (plain(ids).logits - ref).pow(2).mean()
    assert err_sliced < err_plain


def test_layernorm_models_are_refused():
    model, ids, graph = _setup(tiny_opt)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(SliceError, match="RMSNorm models only"):
        slice_residual(model, graph, ids, 16)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_bad_width_is_refused():
    model, ids, graph = _setup(tiny_llama)
    with pytest.raises(SliceError, match="width"):
        slice_residual(model, graph, ids, 0)
