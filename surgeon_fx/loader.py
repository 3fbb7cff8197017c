"""`surgeon_fx.load(folder)`: rebuild a compiled model from its output folder, safely.

The manifest says how to build the *original* module tree — from the Hugging Face config it was compiled
from, or by calling `build()` of the model file — and the `ShrinkPlan` that reshapes it; then
`model.safetensors` is checked against the sha256 in the manifest and loaded into it.

An output folder may come from someone else, so loading runs no code from it by default: a Hugging Face result
is rebuilt from its config alone (no remote code), while a result of a plain model file needs
``trust_source=True`` (like ``trust_remote_code``), which runs the recorded model file when its sha256 still
matches, else the copy kept in the folder's ``source/`` when it matches (a path that leaves the folder is
refused).  The digests
cover the weights and the model file itself, not modules that the model file imports.
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


class LoadError(ValueError):
    """The folder is not an intact output, or loading it would run code the caller did not trust."""


def load(path: str | Path, device: str | torch.device = "cpu", *, trust_source: bool = False) -> nn.Module:
    """The compiled model stored in folder `path`, in eval mode on `device` (see the module docstring)."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a surgeon-compile output folder (no {MANIFEST})")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoadError(f"{folder / MANIFEST} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoadError(f"{folder / MANIFEST}: unknown format "
                        f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r} (expected {FORMAT})")
    digest = manifest.get("weights_sha256")
    if digest is None:
        raise LoadError(f"{folder / MANIFEST} records no sha256 of {WEIGHTS}; the weights cannot be verified")
    if sha256_of(folder / WEIGHTS) != digest:
        raise LoadError(f"{folder / WEIGHTS} does not match the sha256 in its manifest: the file was changed or "
                        f"damaged")
    model = rebuild_original(manifest["source"], folder, trust_source=trust_source)
    if manifest.get("plan"):
        apply_plan(model, ShrinkPlan.from_json(manifest["plan"]))
    for site in manifest.get("tails", []):  # SliceGPT: norms followed by a linear map
        add_tail(model, site)
    load_model(model, str(folder / WEIGHTS), strict=True)
    return model.to(device).eval()


def rebuild_original(source: dict, folder: Path, *, trust_source: bool = False) -> nn.Module:
    """The original (dense, unpruned) module tree described by a manifest's `source` entry."""
    if "hf_config" in source:
        import transformers

        cfg = dict(source["hf_config"])
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        cls = getattr(transformers, source.get("model_class") or "AutoModelForCausalLM", None)
        if cls is None:
            raise ValueError(f"transformers {transformers.__version__} has no class {source['model_class']!r} "
                             f"(recorded in the manifest)")
        build = cls.from_config if cls is transformers.AutoModelForCausalLM else cls._from_config
        experts = {"experts_implementation": source["experts_implementation"]} if source.get(
            "experts_implementation") else {}  # MoE: the default grouped_mm needs 16-byte aligned widths
        model = build(config, attn_implementation=source.get("attn_implementation"),
                      dtype=getattr(torch, source.get("dtype", "float32")), **experts)
        return model.eval()
    if not trust_source:
        raise LoadError(f"{folder} was compiled from the model file {source.get('name')!r}: loading it runs that "
                        f"Python file; pass trust_source=True if you trust the folder and the file")
    recorded = Path(source["path"])
    if recorded.is_file() and sha256_of(recorded) == source["sha256"]:
        return load_model_file(recorded).build()
    copy = (folder / source["copy"]).resolve()
    if not copy.is_relative_to(folder.resolve()):
        raise LoadError(f"{folder / MANIFEST}: the source copy {source['copy']!r} lies outside the folder")
    if not copy.is_file() or sha256_of(copy) != source["sha256"]:
        raise LoadError(f"{folder}: neither the model file {recorded} nor the copy {source['copy']} matches the "
                        f"sha256 in the manifest")
    return load_model_file(copy).build()
