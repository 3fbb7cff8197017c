"""An on-disk cache for results that repeat between runs (today: the dense model's evaluation).

An entry is a small JSON file named by the sha256 of everything the result depends on: the model's weights
(`tensor_digest` over every parameter and buffer: name, dtype, shape, bytes), the data, and the settings that
change the number.  Change any weight or any token and the key changes, so an entry is never stale.  The folder
is ``$SURGEON_CACHE`` or ``~/.cache/surgeon-fx``.  Entries are written to a temporary file and renamed into
place (two runs writing the same key both write the same value); an entry that cannot be read counts as missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn


def default_folder() -> Path:
    """``$SURGEON_CACHE``, else ``~/.cache/surgeon-fx``."""
    return Path(os.environ.get("SURGEON_CACHE") or Path.home() / ".cache" / "surgeon-fx")


def _update(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensor_digest(items: Iterable[tuple[str, Any]]) -> str:
    """sha256 over (name, value) pairs in order; values are tensors, or nested tuples / lists of them, or
    anything with a stable ``repr`` (numbers, strings)."""
    h = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            _update(h, value)
        elif isinstance(value, (tuple, list)):
            h.update(f"[{len(value)}".encode())
            for v in value:
                add(v)
        else:
            h.update(repr(value).encode())

    for name, value in items:
        h.update(name.encode() + b"\0")
        add(value)
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """Digest of a model's parameters and buffers (its class name too)."""
    state = [(n, t) for n, t in model.state_dict(keep_vars=False).items()]
    return tensor_digest([("class", type(model).__qualname__)] + state)


class ResultCache:
    """JSON results under `folder/<kind>/<key>.json`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key}.json"

    def get(self, kind: str, key: str) -> dict | None:
        """The stored result, or None when missing or unreadable."""
        try:
            return json.loads(self.path(kind, key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, kind: str, key: str, value: dict) -> None:
        """Store `value` atomically (temporary file, then rename)."""
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, path)
