"""An ``hf/`` folder for a structured result whose layers keep different widths.

The model's own config class describes one width for all layers, so the folder gets the original (dense) config
plus ``layer_widths`` (heads, KV heads and MLP width of every layer), the modeling file
`surgeon_fx/modeling_surgeon.py` bound to the family's classes, and ``auto_map`` entries pointing at it:
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds the dense architecture, reshapes
each layer to its widths and loads the weights.  Families: the keys of `modeling_surgeon.LAYOUTS`.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from surgeon_fx import modeling_surgeon

TEMPLATE = Path(modeling_surgeon.__file__)
MODELING_FILE = "modeling_surgeon.py"
FAMILY_LINE = "from transformers import LlamaConfig as BaseConfig, LlamaForCausalLM as BaseForCausalLM  # family"


def supports(model: nn.Module, dense_config: dict) -> bool:
    """Whether `model` is a Hugging Face causal LM of a family the modeling file can reshape, with the residual
    width of `dense_config` (the modeling file changes heads and MLP widths, not the residual stream)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in modeling_surgeon.LAYOUTS:
        return False
    hidden = next((dense_config[k] for k in ("hidden_size", "n_embd", "d_model") if k in dense_config), None)
    return model.get_input_embeddings().weight.shape[1] == hidden


def modeling_source(config_class: str, model_class: str) -> str:
    """The modeling file's text with its base classes set to `config_class` and `model_class` of transformers."""
    text = TEMPLATE.read_text(encoding="utf-8")
    if text.count(FAMILY_LINE) != 1:
        raise RuntimeError(f"{TEMPLATE} must contain the line {FAMILY_LINE!r} exactly once")
    return text.replace(FAMILY_LINE, f"from transformers import {config_class} as BaseConfig, "
                                     f"{model_class} as BaseForCausalLM  # family")


def per_layer_config(model: nn.Module, dense_config: dict) -> dict:
    """config.json: the dense config, the per-layer widths of `model`, and the auto_map to the modeling file."""
    family = model.config.model_type
    stem = MODELING_FILE.removesuffix(".py")
    return {**dense_config, "model_type": f"surgeon_{family}", "architectures": ["SurgeonForCausalLM"],
            "auto_map": {"AutoConfig": f"{stem}.SurgeonConfig", "AutoModelForCausalLM": f"{stem}.SurgeonForCausalLM"},
            "layer_widths": modeling_surgeon.layer_widths(model, family)}


def save_per_layer(model: nn.Module, folder: Path, dense_config: dict) -> None:
    """Write `model` (pruned, layers of different widths) into `folder` as described in the module docstring.

    dense_config: the original model's ``config.to_dict()``, recorded before pruning."""
    model.save_pretrained(folder)  # weights (tied ones once) and generation_config.json
    config = per_layer_config(model, dense_config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    source = modeling_source(type(model.config).__name__, type(model).__name__)
    (folder / MODELING_FILE).write_text(source, encoding="utf-8")
