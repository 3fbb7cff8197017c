"""Writing the output folder atomically: model.safetensors, manifest.json, hf/ and the report.

Everything is written into a hidden temporary folder beside the output (``.<name>.tmp-*``) and renamed onto
the output name only when complete, so a crash or an error never leaves a half-written folder that looks
finished.  Tied weights are saved once (`safetensors.torch.save_model` drops the duplicate names).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_model
from torch import nn

from surgeon_fx import hf_export
from surgeon_fx.evaluate import logits_of

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
HF_DIR = "hf"
FORMAT = "surgeon-fx/1"


class EmitError(RuntimeError):
    """The output folder cannot be written (it exists, or its parent is not writable)."""


def check_target(out: Path, overwrite: bool) -> None:
    """Fail early (before any work) when `out` exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise EmitError(f"output folder {out} already exists (choose another --out or pass --overwrite)")
    if out.exists() and not out.is_dir():
        raise EmitError(f"output {out} exists and is not a folder")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success rename it to `out` (replacing it when `overwrite`),
    on any exception delete it and leave `out` as it was."""
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: the folder gets the user's usual permissions
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_weights(model: nn.Module, folder: Path) -> Path:
    """The model's state dict as `folder/model.safetensors` (shared tensors once, made contiguous)."""
    path = folder / WEIGHTS
    save_model(model, str(path), metadata={"format": FORMAT})
    return path


def write_manifest(folder: Path, manifest: dict) -> Path:
    """`folder/manifest.json` with the format tag first."""
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, **manifest}, indent=2) + "\n", encoding="utf-8")
    if (folder / WEIGHTS).exists():  # safetensors writes 0600; give the weights the usual file permissions
        shutil.copymode(path, folder / WEIGHTS)
    return path


def _config_mismatch(model: nn.Module) -> str | None:
    """Why the model's own config class cannot describe its (pruned) shapes, or None when it can."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(model.config)
    except Exception as err:  # noqa: BLE001 - the config class rejects the pruned sizes
        return f"{type(model.config).__name__} cannot describe the pruned model: {type(err).__name__}: {err}"
    want = {n: tuple(t.shape) for n, t in fresh.state_dict().items()}
    extra = sorted(set(model.state_dict()) - set(want))
    if extra:
        return f"the model has tensors its config does not describe (e.g. {extra[0]})"
    for name, t in model.state_dict().items():
        if name in want and want[name] != tuple(t.shape):
            return (f"layer widths differ between layers: {name} is {list(t.shape)}, but the config "
                    f"({type(model.config).__name__}) describes {list(want[name])}")
    return None


def save_hf(model: nn.Module, tokenizer, folder: Path, inputs: torch.Tensor,
            dense_config: dict | None = None) -> str | None:
    """Write `folder` loadable with `AutoModelForCausalLM.from_pretrained`, then load it back and compare
    logits on `inputs`.  Returns None when written and verified, else the reason (and `folder` is removed).
    Layers of different widths: given the original `dense_config`, a per-layer folder (`hf_export`)."""
    from transformers import AutoModelForCausalLM

    reason = _config_mismatch(model)
    remote = reason is not None and dense_config is not None and hf_export.supports(model, dense_config)
    if reason is None or remote:
        reason = None
        if remote:
            hf_export.save_per_layer(model, folder, dense_config)
        else:
            model.save_pretrained(folder)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder)
        try:
            device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=remote).to(device)
            with torch.no_grad():
                diff = (logits_of(loaded.eval(), inputs) - logits_of(model, inputs)).abs().max().item()
            if diff > 1e-4:
                reason = f"logits of the reloaded hf/ model differ by {diff:.3g}"
        except Exception as err:  # noqa: BLE001 - any failure to reload means: do not ship hf/
            reason = f"from_pretrained failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if reason is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return reason
