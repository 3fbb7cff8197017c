"""The model file contract: how `surgeon-compile model.py` gets a model, its inputs and its data.

A model file is a Python file defining:

``build() -> nn.Module``                      required: the dense model, with its weights.
``example_inputs() -> tuple``                 required, unless `build()` returns a Hugging Face causal LM
                                              (then a [1, 16] tensor of token ids is used): the positional
                                              arguments of one forward call, used for tracing.
``calibration(n, length, seed)``              optional: a causal LM returns LongTensor [n, length] of token
                                              ids; any other model returns an iterable of batches and the
                                              file also defines ``loss``.  Needed by every method except
                                              magnitude, unless ``--calib-file`` is given.
``loss(model, batch) -> scalar``              optional: the summed (not averaged) loss of one calibration
                                              batch; its presence marks a model that is not a causal LM.
``evaluation()``                              optional: LongTensor [k, L] windows for perplexity (causal LM),
                                              or batches scored with ``loss`` (other models).
``tokenizer()``                               optional: a callable ``tok(text, return_tensors="pt")`` with
                                              ``["input_ids"]`` (any Hugging Face tokenizer), used for
                                              ``--calib-file`` / ``--eval-file``.

Alternatively ``--hf PATH`` names a local Hugging Face model folder (config + weights + tokenizer), loaded
offline with ``AutoModelForCausalLM``; it has no calibration of its own, so it needs ``--calib-file``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from surgeon_fx.trace import is_hf_causal_lm

OPTIONAL = ("example_inputs", "calibration", "loss", "evaluation", "tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
EXAMPLE_LENGTH = 16  # tokens in the made-up example input of a Hugging Face causal LM


class ModelFileError(ValueError):
    """The model file (or HF folder) does not meet the contract, or one of its functions failed."""


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks (weights can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelFile:
    """A loaded model file: its functions (None where not defined) and where it came from.

    `path`/`sha256` name the Python file; `hf_path` the Hugging Face folder for ``--hf``.
    """

    name: str
    build_fn: Callable[[], nn.Module]
    example_inputs_fn: Callable[[], tuple] | None = None
    calibration_fn: Callable[..., Any] | None = None
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None
    evaluation_fn: Callable[[], Any] | None = None
    tokenizer_fn: Callable[[], Any] | None = None
    path: Path | None = None
    sha256: str | None = None
    hf_path: Path | None = None

    @property
    def is_lm(self) -> bool:
        """True when data are token windows (no `loss`): the model is treated as a causal LM."""
        return self.loss is None

    def build(self) -> nn.Module:
        """Call `build()` and check that it returned a module."""
        model = self._call("build", self.build_fn)
        if not isinstance(model, nn.Module):
            raise ModelFileError(f"{self.name}: build() returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def example_inputs(self, model: nn.Module) -> tuple:
        """The tracing inputs: `example_inputs()`, or token ids for a Hugging Face causal LM."""
        if self.example_inputs_fn is None:
            if not is_hf_causal_lm(model):
                raise ModelFileError(f"{self.name} does not define example_inputs() (required unless build() "
                                     f"returns a Hugging Face causal LM)")
            vocab = int(model.config.vocab_size)
            return (torch.arange(EXAMPLE_LENGTH)[None] % vocab,)
        inputs = self._call("example_inputs", self.example_inputs_fn)
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if not isinstance(inputs, (tuple, list)) or not inputs:
            raise ModelFileError(f"{self.name}: example_inputs() must return a non-empty tuple, "
                                 f"got {type(inputs).__name__}")
        return tuple(inputs)

    def calibration(self, n: int, length: int, seed: int) -> Any:
        """`calibration(n, length, seed)`, checked: [n, length] token ids for an LM, non-empty batches else."""
        if self.calibration_fn is None:
            raise ModelFileError(f"no calibration data: {self.name} does not define calibration(n, length, seed); "
                                 f"pass --calib-file TEXT or use --method magnitude")
        data = self._call("calibration", self.calibration_fn, n, length, seed)
        if self.is_lm:
            return check_windows(data, f"{self.name}: calibration()", n, length)
        data = list(data) if not isinstance(data, torch.Tensor) else list(data.split(1))
        if not data:
            raise ModelFileError(f"{self.name}: calibration() returned no batches")
        return data

    def evaluation(self) -> Any:
        """`evaluation()` (None when not defined): [k, L] windows for an LM, a list of batches else."""
        if self.evaluation_fn is None:
            return None
        data = self._call("evaluation", self.evaluation_fn)
        if self.is_lm:
            return check_windows(data, f"{self.name}: evaluation()")
        data = list(data)
        if not data:
            raise ModelFileError(f"{self.name}: evaluation() returned no batches")
        return data

    def tokenizer(self) -> Any:
        """`tokenizer()`; an error naming the option that needed it when not defined."""
        if self.tokenizer_fn is None:
            raise ModelFileError(f"{self.name} does not define tokenizer(), needed to read a text file "
                                 f"(--calib-file / --eval-file)")
        return self._call("tokenizer", self.tokenizer_fn)

    def checked_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """`loss(model, batch)`, checked to be a one-element floating-point tensor (returned as a scalar)."""
        value = self._call("loss", self.loss, model, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                   else type(value).__name__)
            raise ModelFileError(f"{self.name}: loss(model, batch) must return a scalar floating-point tensor "
                                 f"(summed over the batch), got {got}")
        return value.reshape(())

    def _call(self, what: str, fn: Callable, *args):
        try:
            return fn(*args)
        except ModelFileError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's code: report it in one line
            raise ModelFileError(f"{self.name}: {what}() failed: {type(err).__name__}: "
                                 f"{_first_line(err)}") from err


def check_windows(data: Any, what: str, n: int | None = None, length: int | None = None) -> torch.Tensor:
    """Validate token windows: an integer tensor [k, L] (k = n and L = length when given)."""
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.is_floating_point():
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ModelFileError(f"{what} must return an integer tensor [windows, length] of token ids, got {shape}")
    if data.shape[0] == 0 or data.shape[1] < 2:
        raise ModelFileError(f"{what} returned too little data: {tuple(data.shape)}")
    if n is not None and data.shape[0] < n:
        raise ModelFileError(f"{what} returned {data.shape[0]} windows, fewer than the {n} asked for")
    if length is not None and data.shape[1] < length:
        raise ModelFileError(f"{what} returned windows of {data.shape[1]} tokens, shorter than the {length} "
                             f"asked for")
    return data[: n or data.shape[0], : length or data.shape[1]].long()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def load_model_file(path: str | Path) -> ModelFile:
    """Import a model file and collect its contract functions; ModelFileError when it cannot be used."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"model file {path} is a folder, not a Python file (for a Hugging Face model folder "
                             f"use --hf {path})")
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if path.suffix != ".py":
        raise ModelFileError(f"model file {path} is not a Python file (.py)")
    digest = sha256_of(path)
    module = _import(path, digest)
    fns = {name: getattr(module, name, None) for name in ("build",) + OPTIONAL}
    if fns["build"] is None:
        raise ModelFileError(f"{path.name} does not define build()")
    for name, fn in fns.items():
        if fn is not None and not callable(fn):
            raise ModelFileError(f"{path.name}: {name} is not a function")
    if fns["calibration"] is not None and len(inspect.signature(fns["calibration"]).parameters) != 3:
        raise ModelFileError(f"{path.name}: calibration must take (n, length, seed)")
    return ModelFile(path.name, fns["build"], fns["example_inputs"], fns["calibration"], fns["loss"],
                     fns["evaluation"], fns["tokenizer"], path.resolve(), digest)


def _import(path: Path, digest: str) -> ModuleType:
    """Execute the file as a fresh module (its own name, so two model files never collide)."""
    name = f"surgeon_model_{path.stem}_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's code: report it in one line
        sys.modules.pop(name, None)
        raise ModelFileError(f"{path.name} failed to import: {type(err).__name__}: {_first_line(err)}") from err
    return module


def from_hf_folder(path: str | Path) -> ModelFile:
    """A local Hugging Face causal-LM folder as a model file (offline; tokenizer when the folder has one)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFileError(f"--hf {path}: not a Hugging Face model folder (no config.json); only local folders "
                             f"work offline")

    def build() -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        model.config.use_cache = False
        return model.eval()

    def tokenizer():
        from transformers import AutoTokenizer

        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ModelFileError(f"--hf {path}: the folder has no tokenizer ({', '.join(TOKENIZER_FILES)})")
        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    return ModelFile(path.name, build, tokenizer_fn=tokenizer, hf_path=path.resolve())
