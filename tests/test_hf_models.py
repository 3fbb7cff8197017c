import math
from pathlib import Path

import pytest
import torch

from surgeon_fx.hf import tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2
from tests.archs import tiny_gemma
from surgeon_fx.trace import LogitsOf

DATA = Path(__file__).resolve().parents[1] / "../shared/data"
BUILDERS = [tiny_llama, lambda: tiny_llama(gqa=False), tiny_opt, tiny_gpt2, tiny_qwen2, tiny_gemma]


@pytest.mark.parametrize("build", BUILDERS, ids=["llama", "llama_mha", "opt", "gpt2", "qwen2", "gemma"])
def test_tiny_model_runs_and_exports(build):
    model = build()
    assert not model.training and not model.config.use_cache
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    wrapped = LogitsOf(model)
    logits = wrapped(ids)
    assert logits.shape == (2, 12, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    exported = torch.export.export(wrapped, (ids,), strict=False)
    torch.testing.assert_close(exported.module()(ids), logits)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "aten.scaled_dot_product_attention.default" in targets


def test_tiny_builders_are_seeded():
    a, b = tiny_llama(), tiny_llama()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = tiny_llama(seed=1)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_tiny_llama_gqa_heads():
    assert tiny_llama(gqa=True).config.num_key_value_heads == 2
    assert tiny_llama(gqa=False).config.num_key_value_heads == 4


@pytest.mark.slow
def test_smollm2_loads_and_dense_perplexity():
    from surgeon_fx.data import eval_windows, read_text, tokenize
    from surgeon_fx.evaluate import perplexity
    from surgeon_fx.hf import load_smollm2

    model, tokenizer = load_smollm2()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert len(model.model.layers) == 30 and not model.training and not cfg.use_cache
    ids = tokenize(tokenizer, read_text(DATA / "wikitext-2-raw/wiki.test.raw"))
    result = perplexity(model, eval_windows(ids, 2048, limit=4))
    assert result.windows == 4 and result.tokens == 4 * 2047
    assert math.isfinite(result.ppl) and result.ppl < 40
