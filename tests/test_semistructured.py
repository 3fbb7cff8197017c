"""2:4 semi-structured conversion: the CPU fallback, the mask checks, and (with a GPU) outputs vs the masked model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from surgeon_fx.passes.nm import nm_mask
from surgeon_fx.passes.semistructured import (SemiStructuredLinear, SemiStructuredUnavailable, check_available, nm_violations,
                                   plan, relative_error, skip_reason, to_semi_structured)
from surgeon_fx.hf import tiny_llama

LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@torch.no_grad()
def mask_24(model: nn.Module) -> None:
    """Keep the 2 largest |w| of every 4 inputs in every decoder linear (the lm_head stays dense)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in LAYER_LINEARS:
            mod.weight.mul_(nm_mask(mod.weight.abs(), 2, 4))


def test_nm_violations_counts_blocks():
    w = torch.tensor([[1.0, 0, 2, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    assert nm_violations(w) == 2  # row 0 block 1 (3 nonzeros), row 1 block 1 (4)
    assert nm_violations(w, n=3) == 1
    w[0, 5] = 0
    w[1, 4:6] = 0
    assert nm_violations(w) == 0
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_violations(torch.ones(2, 6))


def test_skip_reasons():
    w = torch.randn(64, 128)
    assert "not 2:4" in skip_reason(w, "cusparselt")
    w24 = w * nm_mask(w.abs(), 2, 4)
    assert skip_reason(w24, "cusparselt") is None and skip_reason(w24, "cutlass") is None
    w24 = w24[:, :96]
    assert skip_reason(w24, "cusparselt") is None
    assert "multiple of 32×64" in skip_reason(w24, "cutlass")
    assert "multiple of 4" in skip_reason(torch.randn(16, 18), "cusparselt")


def test_plan_picks_masked_linears_of_tiny_llama():
    model = tiny_llama()
    mask_24(model)
    report = plan(model, "cusparselt")
    assert len(report.converted) == 2 * len(LAYER_LINEARS)
    assert set(report.skipped) == {"lm_head"} and "not 2:4" in report.skipped["lm_head"]
    cutlass = plan(model, "cutlass")  # hidden 64, FFN 96: down_proj's 96 inputs are not a multiple of 64
    assert all("down_proj" in n for n in cutlass.skipped if n != "lm_head")
    assert len(cutlass.skipped) == 3


@pytest.mark.skipif(_capable(), reason="this machine has a capable GPU")
def test_cpu_fallback_raises_and_leaves_model_untouched():
    model = tiny_llama()
    mask_24(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(SemiStructuredUnavailable, match=r"needs a CUDA GPU with compute capability ≥ 8\.0"):
        to_semi_structured(model)
    with pytest.raises(SemiStructuredUnavailable):
        check_available()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.device.type == "cpu" and torch.equal(p, before[n])


def test_semi_structured_linear_flattens_inputs():
    """The wrapper's 2-D flattening (shown with a dense weight: the sparse one needs a GPU) equals nn.Linear."""
    lin = nn.Linear(8, 4)
    wrapped = SemiStructuredLinear(lin.weight.detach(), lin.bias)
    x = torch.randn(2, 3, 8)
    assert wrapped.in_features == 8 and wrapped.out_features == 4
    assert torch.allclose(wrapped(x), lin(x), atol=1e-6)


def test_rejects_float32():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        to_semi_structured(tiny_llama(), dtype=torch.float32)


@pytest.mark.skipif(not _capable(), reason="needs a CUDA GPU with compute capability ≥ 8.0")
def test_cuda_sparse_model_matches_masked_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    mask_24(model)
    reference = copy.deepcopy(model).to("cuda", torch.float16)
    report = to_semi_structured(model, torch.float16)
    assert len(report.converted) == 2 * len(LAYER_LINEARS), report.skipped
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    assert relative_error(model, reference, (ids,)) < 2e-2
