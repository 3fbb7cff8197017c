"""What pruning removes, and how much of it may be kept: the one owner of `structure` and `target`.

* ``structured``: whole units of the dependency graph's groups (heads, KV heads, neurons, channels); the model
  is rewritten physically smaller.
* ``unstructured``: single weights (masks; dense tensors with zeros).
* ``N:M`` (e.g. ``2:4``): N of every M consecutive weights along a layer's input are kept.

`target` is the fraction of prunable parameters kept: 0 < target < 1 for structured and unstructured pruning;
for N:M it is N/M by definition (`Structure.kept`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CHOICES = ("structured", "unstructured", "2:4", "4:8")  # the common ones, for help texts; any N:M parses


class StructureError(ValueError):
    """A structure name or target that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Structure:
    """kind: "structured" | "unstructured" | "nm"; n, m: kept n of every m (kind "nm" only)."""

    kind: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, value: "Structure | str") -> "Structure":
        """A Structure from its name ("structured", "unstructured", "N:M" with 0 < N < M); StructureError else."""
        if isinstance(value, Structure):
            return value
        if not isinstance(value, str):
            raise StructureError(f"structure must be a string such as {', '.join(CHOICES)}, got {value!r}")
        if value in ("structured", "unstructured"):
            return cls(value)
        n, sep, m = value.partition(":")
        if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
            return cls("nm", int(n), int(m))
        raise StructureError(f"structure must be one of {', '.join(CHOICES)} (or any N:M with 0 < N < M), "
                             f"not {value!r}")

    @property
    def structured(self) -> bool:
        return self.kind == "structured"

    @property
    def nm(self) -> tuple[int, int] | None:
        """(n, m) for semi-structured pruning, else None."""
        return (self.n, self.m) if self.kind == "nm" else None

    def kept(self, target: float) -> float:
        """The fraction of prunable parameters kept at the end: `target`, or n/m for N:M."""
        return self.n / self.m if self.kind == "nm" else target

    def check_target(self, target: float) -> None:
        """0 < target < 1 (a fraction kept), a real number; N:M ignores the target."""
        if self.kind == "nm":
            return
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
            raise StructureError(f"target must be a number between 0 and 1 (the fraction of prunable parameters "
                                 f"kept), got {target!r}")
        if not 0.0 < target < 1.0:
            raise StructureError(f"target must be between 0 and 1 (the fraction of prunable parameters kept), "
                                 f"got {target:g}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind
