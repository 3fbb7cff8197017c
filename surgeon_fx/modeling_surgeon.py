"""Modeling code for a Hugging Face causal LM whose layers keep different widths (written by surgeon-fx).

This file is copied into the ``hf/`` folder of a structured result, with the import line marked ``family``
naming the original model's classes, and registered in ``config.json``'s ``auto_map``; load the folder with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

The config is the original (dense) model's config plus ``layer_widths``: one entry per decoder layer,
``{"num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": f}``.  The model class builds the
original architecture and then replaces, in layer i, the attention projections by ones of h (query/output) and
kv (key/value) heads of the original head size, and the MLP projections by ones of width f — the pattern of
published heterogeneous-width models (per-block configs with their own modeling code, as NVIDIA's
Nemotron-NAS / DeciLM).  Nothing else changes: embeddings, norms, the residual width and the forward code are
the family's own.

Needs only ``torch`` and ``transformers``; it does not import surgeon_fx.
"""
from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig as BaseConfig, LlamaForCausalLM as BaseForCausalLM  # family

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
WIDTH_ATTRS = ("split_size", "all_head_size", "inner_dim", "embed_dim")  # = heads × head_dim


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its layers and projections (paths relative to one decoder layer).

    query: projections of h × head_dim outputs (times `fused` for one q|k|v matrix); key_value: of kv × head_dim
    outputs; output: the projection reading h × head_dim; up: projections of f outputs; down: reading f."""

    layers: str
    attention: str
    query: tuple[str, ...]
    key_value: tuple[str, ...]
    output: str
    up: tuple[str, ...]
    down: str
    fused: int = 1


LLAMA = Layout("model.layers", "self_attn", ("q_proj",), ("k_proj", "v_proj"), "o_proj",
               ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
LAYOUTS = {
    **{family: LLAMA for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "opt": Layout("model.decoder.layers", "self_attn", ("q_proj",), ("k_proj", "v_proj"), "out_proj",
                  ("fc1",), "fc2"),
    "gpt2": Layout("transformer.h", "attn", ("c_attn",), (), "c_proj", ("mlp.c_fc",), "mlp.c_proj", fused=3),
}


def out_features(module: nn.Module) -> int:
    """Output width of an nn.Linear or a GPT-2 style Conv1D (weight stored [in, out])."""
    return module.nf if hasattr(module, "nf") else module.out_features


def resized(module: nn.Module, inputs: int, outputs: int) -> nn.Module:
    """A new projection of the same kind (nn.Linear or Conv1D, bias or not) mapping `inputs` → `outputs`."""
    bias = module.bias is not None
    fresh = type(module)(outputs, inputs) if hasattr(module, "nf") else nn.Linear(inputs, outputs, bias=bias)
    return fresh.to(device=module.weight.device, dtype=module.weight.dtype)


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if hasattr(module, "nf") else module.in_features


def _replace(layer: nn.Module, path: str, inputs: int | None = None, outputs: int | None = None) -> None:
    parent, _, name = path.rpartition(".")
    owner = layer.get_submodule(parent) if parent else layer
    old = getattr(owner, name)
    setattr(owner, name, resized(old, inputs or _in_features(old), outputs or out_features(old)))


def _set_head_counts(attn: nn.Module, heads: int, kv_heads: int, old_width: int) -> None:
    """Set the attention module's head-count attributes (those it has) for `heads` query and `kv_heads` key/value
    heads; width attributes equal to the old heads × head_dim become heads × head_dim."""
    new = {**{a: heads for a in HEAD_ATTRS}, **{a: kv_heads for a in KV_ATTRS},
           "num_key_value_groups": heads // kv_heads}
    new.update({a: heads * attn.head_dim for a in WIDTH_ATTRS if getattr(attn, a, None) == old_width})
    for name, value in new.items():
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)


def layer_widths(model: nn.Module, family: str) -> list[dict[str, int]]:
    """The per-layer widths of a (pruned) model of `family`, read off its projections."""
    layout = LAYOUTS[family]
    out = []
    for layer in model.get_submodule(layout.layers):
        attn = layer.get_submodule(layout.attention)
        d = attn.head_dim
        heads = out_features(attn.get_submodule(layout.query[0])) // (d * layout.fused)
        kv = out_features(attn.get_submodule(layout.key_value[0])) // d if layout.key_value else heads
        out.append({"num_attention_heads": heads, "num_key_value_heads": kv,
                    "intermediate_size": out_features(layer.get_submodule(layout.up[0]))})
    return out


def reshape_layers(model: nn.Module, family: str, widths: list[dict[str, int]]) -> None:
    """Give layer i of `model` (built from the dense config) the widths `widths[i]`, in place."""
    layout = LAYOUTS[family]
    layers = model.get_submodule(layout.layers)
    if len(widths) != len(layers):
        raise ValueError(f"layer_widths has {len(widths)} entries for {len(layers)} layers")
    for layer, w in zip(layers, widths):
        attn = layer.get_submodule(layout.attention)
        d, h, kv, f = attn.head_dim, w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]
        _set_head_counts(attn, h, kv, out_features(attn.get_submodule(layout.query[0])) // layout.fused)
        for path in layout.query:
            _replace(attn, path, outputs=h * d * layout.fused)
        for path in layout.key_value:
            _replace(attn, path, outputs=kv * d)
        _replace(attn, layout.output, inputs=h * d)
        for path in layout.up:
            _replace(layer, path, outputs=f)
        _replace(layer, layout.down, inputs=f)


@strict
class SurgeonConfig(BaseConfig):
    """The original model's config plus `layer_widths` (one dict per decoder layer, see the module docstring)."""

    model_type = f"surgeon_{BaseConfig.model_type}"
    layer_widths: list | None = None


class SurgeonForCausalLM(BaseForCausalLM):
    """The family's causal LM with per-layer attention and MLP widths from `config.layer_widths`."""

    config_class = SurgeonConfig

    def __init__(self, config: SurgeonConfig):
        super().__init__(config)
        if config.layer_widths is not None:
            reshape_layers(self, BaseConfig.model_type, config.layer_widths)
