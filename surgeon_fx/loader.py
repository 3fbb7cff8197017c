"""`surgeon_fx.load(folder)`: rebuild a compiled model from its output folder.

The manifest says how to build the *original* module tree — from the Hugging Face config it was compiled
from, or by calling `build()` of the model file (the recorded path when its sha256 still matches, else the copy
kept in the folder) — and the `ShrinkPlan` that reshapes it; then `model.safetensors` is loaded into it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model
from torch import nn

from surgeon_fx.emit import FORMAT, MANIFEST, WEIGHTS
from surgeon_fx.passes.rewrite import ShrinkPlan, apply_plan
from surgeon_fx.passes.slicegpt import add_tail
from surgeon_fx.modelfile import load_model_file, sha256_of


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The compiled model stored in folder `path`, in eval mode on `device`."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a surgeon-compile output folder (no {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    model = rebuild_original(manifest["source"], folder)
    if manifest.get("plan"):
        apply_plan(model, ShrinkPlan.from_json(manifest["plan"]))
    for site in manifest.get("tails", []):  # SliceGPT: norms followed by a linear map
        add_tail(model, site)
    load_model(model, str(folder / WEIGHTS), strict=True)
    return model.to(device).eval()


def rebuild_original(source: dict, folder: Path) -> nn.Module:
    """The original (dense, unpruned) module tree described by a manifest's `source` entry."""
    if "hf_config" in source:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(source["hf_config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=source.get("attn_implementation"),
                                                 dtype=getattr(torch, source.get("dtype", "float32")))
        return model.eval()
    recorded = Path(source["path"])
    if recorded.is_file() and sha256_of(recorded) == source["sha256"]:
        path = recorded
    else:
        path = folder / source["copy"]
    return load_model_file(path).build()
