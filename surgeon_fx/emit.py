"""Writing the output folder safely: model.safetensors, manifest.json, hf/ and the report.

Promises (docs/reliability.md):

- *atomic*: everything is written into a hidden temporary folder beside the output (``.<name>.tmp-*``) and
  renamed onto the output name only when complete, so a crash or an error never leaves a half-written folder
  that looks finished;
- *locked*: `output_lock` holds an exclusive `flock` on ``.<name>.lock`` beside the output from the first check
  to the final rename, so two runs writing the same output cannot both succeed (the second fails at once);
  the lock dies with its process, and the holder removes temporary folders that a killed run left;
- *no data loss*: an existing output is replaced only with ``overwrite`` and only when it is an earlier
  surgeon-compile output (it holds a manifest of this format) or an empty folder; it is checked again right
  before the rename;
- *byte-reproducible*: tied weights are saved once under their first name, and the safetensors header's
  metadata has a single key, so identical runs write identical bytes; the manifest records the file's sha256.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from surgeon_fx import hf_export
from surgeon_fx.evaluate import main_output
from surgeon_fx.modelfile import sha256_of

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
HF_DIR = "hf"
FORMAT = "surgeon-fx/1"


class EmitError(RuntimeError):
    """The output folder cannot be written (it exists, another run writes it, or its parent is not writable)."""


def _hidden(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}"


def is_earlier_output(out: Path) -> bool:
    """Whether folder `out` is a surgeon-compile output (its manifest has this format)."""
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out: Path, overwrite: bool) -> None:
    """Fail when `out` exists and may not be replaced: without `overwrite`, or when it is neither an earlier
    output nor an empty folder (then `overwrite` would delete someone's files)."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise EmitError(f"output folder {out} already exists (choose another --out or pass --overwrite)")
    if out.is_symlink() or not out.is_dir():
        raise EmitError(f"output {out} exists and is not a folder; --overwrite replaces only an earlier output")
    if not is_earlier_output(out) and any(out.iterdir()):
        raise EmitError(f"--overwrite refused: {out} is not an earlier surgeon-compile output (no {MANIFEST}) "
                        f"and not empty; choose another --out")


@contextmanager
def output_lock(out: Path, overwrite: bool = False) -> Iterator[None]:
    """Hold the lock of output `out` (see the module docstring); checks `out` (`check_target`) under the lock
    and removes temporary folders of earlier, killed runs.  Parent folders it creates are removed again when
    the block fails and leaves them empty."""
    check_target(out, overwrite)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = out.parent / _hidden(out, "lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        _remove_empty(created)
        raise EmitError(f"cannot write the output {out}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # locked a file its holder just removed
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise EmitError(f"output {out} is being written by another surgeon-compile run "
                            f"(it holds {lock.name}); wait for it or choose another --out") from None
        check_target(out, overwrite)  # again: a run that held the lock may have finished meanwhile
        for stale in out.parent.glob(f"{_hidden(out, 'tmp')}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.unlink(lock)  # before unlocking: a waiter then fails to lock a fresh file, never a stale one
            if not ok:
                _remove_empty(created)
    finally:
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success rename it to `out`, on any exception delete it and
    leave `out` as it was.  Call it while holding `output_lock(out)`.  `out` is checked again just before the
    rename (`check_target`), and without `overwrite` the rename never replaces an existing folder."""
    out = Path(out)
    check_target(out, overwrite)
    tmp = out.parent / f"{_hidden(out, 'tmp')}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()  # not mkdtemp: the folder gets the user's usual permissions
    except OSError as err:
        raise EmitError(f"cannot write the output {out}: {err.strerror or err}") from None
    try:
        yield tmp
        check_target(out, overwrite)
        if out.exists():
            old = out.parent / f"{_hidden(out, 'tmp')}-old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            _rename_new(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_new(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing (EmitError) when `dst` appeared meanwhile (`os.rename` alone would replace
    an empty folder): an `os.mkdir` claims the name, which fails when anything is there."""
    try:
        os.mkdir(dst)  # claims the name: fails when something is there
    except FileExistsError:
        raise EmitError(f"output folder {dst} appeared while this run was working; nothing of it was "
                        f"replaced") from None
    os.replace(src, dst)  # replaces only the empty folder this run just made


def save_weights(model: nn.Module, folder: Path) -> Path:
    """The model's state dict as `folder/model.safetensors`: tensors that share memory (tied weights) once,
    under their first name; contiguous; one metadata key, so the bytes depend on the weights only."""
    path = folder / WEIGHTS
    save_file(unique_tensors(model.state_dict()), str(path), metadata={"format": FORMAT})
    return path


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without later names of a tensor already present (same storage, offset, shape and strides),
    each made contiguous; `safetensors.torch.load_model` restores the tied names from the module."""
    seen, kept = set(), {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            kept[name] = t.contiguous()
    return kept


def write_manifest(folder: Path, manifest: dict) -> Path:
    """`folder/manifest.json` with the format tag first and the sha256 of the weights."""
    path = folder / MANIFEST
    weights = folder / WEIGHTS
    digest = {"weights_sha256": sha256_of(weights)} if weights.exists() else {}
    path.write_text(json.dumps({"format": FORMAT, **manifest, **digest}, indent=2) + "\n", encoding="utf-8")
    if weights.exists():  # safetensors writes 0600; give the weights the usual file permissions
        shutil.copymode(path, weights)
    return path


def _config_mismatch(model: nn.Module) -> str | None:
    """Why the model's own config class cannot describe its (pruned) shapes, or None when it can."""
    try:
        with torch.device("meta"):
            fresh = type(model)._from_config(model.config)
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


def save_hf(model: nn.Module, tokenizer, folder: Path, inputs: tuple, dense_config: dict | None = None) -> str | None:
    """Write `folder` loadable with the model's class `.from_pretrained` (`AutoModelForCausalLM` for a causal
    LM), then load it back and compare outputs on `inputs` (the forward arguments).  Layers of different widths:
    given the original `dense_config`, a per-layer folder with its own modeling file (`hf_export`), loaded with
    `trust_remote_code=True`.  Returns None when written and verified, else the reason (and `folder` is
    removed): hf/ is optional, so no failure here (saving included) may cost the main result."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    reason = _config_mismatch(model)
    remote = reason is not None and dense_config is not None and hf_export.supports(model, dense_config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the pipeline shows its own stage bar
    if reason is None or remote:
        reason = None
        try:
            if remote:
                hf_export.save_per_layer(model, folder, dense_config)
            else:
                model.save_pretrained(folder)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(folder)
            device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
            loaded = (AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=True) if remote
                      else type(model).from_pretrained(folder, dtype=dtype)).to(device)
            with torch.no_grad():
                diff = (main_output(loaded.eval(), inputs) - main_output(model, inputs)).abs().max().item()
            if not diff <= 1e-4:  # NaN included
                reason = f"logits of the reloaded hf/ model differ by {diff:.3g}"
        except Exception as err:  # noqa: BLE001 - any failure to write or reload means: do not ship hf/
            reason = f"hf/ export failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if bars:
        hf_logging.enable_progress_bar()
    if reason is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return reason
