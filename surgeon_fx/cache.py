"""An on-disk cache for results that repeat between runs (today: the dense model's evaluation).

An entry is a small JSON file named by the sha256 of everything the result depends on (`data.digest`): the
model's weights (`model_digest`: every parameter and buffer, name, dtype, shape and bytes), the data, and the
settings that change the number.  Change any weight or any token and the key changes, so an entry is never
stale.  The folder is ``$SURGEON_CACHE`` or ``~/.cache/surgeon-fx``.  Entries are written to a temporary file and renamed into
place (two runs writing the same key both write the same value); an entry that cannot be read counts as missing.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from torch import nn

from surgeon_fx.data import digest


def default_folder() -> Path:
    """``$SURGEON_CACHE``, else ``~/.cache/surgeon-fx``."""
    return Path(os.environ.get("SURGEON_CACHE") or Path.home() / ".cache" / "surgeon-fx")


def model_digest(model: nn.Module) -> str:
    """Digest (`data.digest`) of a model's class name and its parameters and buffers."""
    return digest({"class": type(model).__qualname__, "state": model.state_dict()})


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
