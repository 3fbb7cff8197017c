"""Where Kronecker factors wait between collection and the shot: off the compute device.

A structured shot reads each layer's factors twice (once to price units, once to update the layer) and works
on one layer at a time, so the factors of the other layers need not sit on the GPU.  `FactorStore` keeps them

* in CPU memory (`folder=None`): float32 A [in', in'] and G [out, out] per layer, nothing float64;
* or in one file per layer under `folder` (`torch.save`, read back memory-mapped), when CPU memory is short too.

A and G are symmetric, so each is kept as its lower triangle, rows concatenated (d(d+1)/2 entries instead of d²:
half the memory or disk; `pack` / `unpack`, exact); a matrix that is not exactly symmetric is kept whole.
It is a read-only mapping name → `KronFactors` (full tensors on the CPU, unpacked on each read) with `put` to add
a layer; the driver moves a layer's factors to its compute device when it needs them and drops them after.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from surgeon_fx.passes.curvature import KronFactors


def pack(M: Tensor) -> Tensor:
    """[d, d] → its lower triangle as [d(d+1)/2] (row i contributes M[i, :i+1]) when M equals Mᵀ exactly; any
    other tensor is returned as it is."""
    if M.dim() != 2 or M.shape[0] != M.shape[1] or not torch.equal(M, M.T):
        return M
    return torch.cat([M[i, :i + 1] for i in range(M.shape[0])])


def unpack(packed: Tensor) -> Tensor:
    """Inverse of `pack`: the symmetric [d, d] matrix from its packed lower triangle (a 2-D tensor as it is)."""
    if packed.dim() == 2:
        return packed
    d = math.isqrt(2 * packed.numel())
    out = packed.new_empty(d, d)
    pos = 0
    for i in range(d):
        row = packed[pos:pos + i + 1]
        out[i, :i + 1] = row
        out[:i, i] = row[:i]
        pos += i + 1
    return out


class FactorStore(Mapping):
    """name → KronFactors kept on the CPU (`folder` None) or in `folder/<index>.pt` files (`folder` given)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._items: dict[str, KronFactors | Path] = {}

    def put(self, name: str, factors: KronFactors) -> None:
        """Store one layer's factors (copied to the CPU, or written to a file and not kept in memory)."""
        A, G = pack(factors.A.detach().to("cpu")), pack(factors.G.detach().to("cpu"))
        if self.folder is None:
            self._items[name] = KronFactors(A, G, factors.tokens)
            return
        path = self._items.get(name) or self.folder / f"{len(self._items)}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"name": name, "A": A, "G": G, "tokens": factors.tokens}, tmp)
        os.replace(tmp, path)
        self._items[name] = path

    def __getitem__(self, name: str) -> KronFactors:
        item = self._items[name]
        if isinstance(item, KronFactors):
            return KronFactors(unpack(item.A), unpack(item.G), item.tokens)
        data = torch.load(item, weights_only=True, mmap=True)
        return KronFactors(unpack(data["A"]), unpack(data["G"]), data["tokens"])

    def stored_bytes(self) -> int:
        """Bytes the stored factors take (in memory, or in their files): packed, so about half of d² per factor."""
        total = 0
        for item in self._items.values():
            if isinstance(item, KronFactors):
                total += item.A.nbytes + item.G.nbytes
            else:
                total += item.stat().st_size
        return total

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
