"""Index spaces: union-find over tensor dimensions, with product and concatenation structure.

Every dimension of every tensor in the traced graph owns a *space* of `size` indices.  Two spaces are
*unioned* when index i of one must be removed together with index i of the other (a linear layer's input
features and the previous layer's output features).  A space can be *split*:

- `prod` (a reshape of 576 into 9 heads × 64): index i = Σ_j c_j · stride_j, one coordinate per factor; removing
  index k of a factor removes every index whose coordinate there is k.
- `cat` (a concatenation or a slice): the space is the concatenation of its children's ranges.

Spaces that are never split are *leaves*; the leaves that survive (not frozen, size > 1) are the prunable
dimensions, and each of their indices is one removable unit.  Frozen spaces (model inputs and outputs, ops
without a rule) are never pruned; `inexact` marks spaces where removal differs from zeroing (a normalisation
reduces over them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Spaces:
    size: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    split: dict[int, tuple[str, list[int]]] = field(default_factory=dict)  # root -> (kind, child ids)
    frozen: dict[int, str] = field(default_factory=dict)  # root -> reason
    inexact: set[int] = field(default_factory=set)

    def new(self, size: int) -> int:
        self.size.append(int(size))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def freeze(self, i: int, reason: str) -> None:
        r = self.find(i)
        self.frozen.setdefault(r, reason)

    def mark_inexact(self, i: int) -> None:
        self.inexact.add(self.find(i))

    # -- unions -------------------------------------------------------------------------------------
    def union(self, a: int, b: int) -> int:
        """Identify spaces a and b index by index (equal sizes); reconcile their splits."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise ValueError(f"cannot union spaces of sizes {self.size[ra]} and {self.size[rb]}")
        sa, sb = self.split.pop(ra, None), self.split.pop(rb, None)
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if rb in self.inexact:
            self.inexact.discard(rb)
            self.inexact.add(ra)
        if sa is not None:
            self.split[ra] = sa
        if sb is not None:
            self._impose(ra, sb)
        return ra

    def _impose(self, root: int, split: tuple[str, list[int]]) -> None:
        """Give `root` the split `split` too: reconcile with the split it may already have."""
        kind, children = split
        sizes = [self.size[self.find(c)] for c in children]
        mine = self.refine(root, kind, sizes)
        if mine is None:
            self.freeze(root, f"conflicting {kind} structures")
            for c in children:
                self.freeze(c, f"conflicting {kind} structures")
            return
        for m, c in zip(mine, children):
            self.union(m, c)

    # -- splits -------------------------------------------------------------------------------------
    def refine(self, i: int, kind: str, sizes: list[int]) -> list[int] | None:
        """Return child spaces of `i` with the given split (`prod` factors or `cat` segment sizes).

        Creates the split if `i` is a leaf; reuses or refines an existing split of the same kind when the
        boundaries are compatible; returns None when they are not (the caller freezes).
        """
        r = self.find(i)
        total = math.prod(sizes) if kind == "prod" else sum(sizes)
        if total != self.size[r]:
            raise ValueError(f"{kind} split {sizes} does not match size {self.size[r]}")
        if len(sizes) == 1:
            return [r]
        existing = self.split.get(r)
        if existing is None:
            kids = [self.new(s) for s in sizes]
            self.split[r] = (kind, kids)
            if r in self.frozen:
                for k in kids:
                    self.frozen[k] = self.frozen[r]
            return kids
        ekind, ekids = existing
        if ekind != kind:
            return None
        esizes = [self.size[self.find(k)] for k in ekids]
        if esizes == list(sizes):
            return [self.find(k) for k in ekids]
        # Common refinement: both lists must cut the range at boundaries that nest.
        fine = _sizes_from_boundaries(
            kind, sorted(set(_boundaries(kind, sizes)) | set(_boundaries(kind, esizes))), self.size[r])
        if fine is None:
            return None
        pieces: list[int] = []
        for k, run in zip(ekids, _runs(kind, fine, esizes)):
            sub = self.refine(k, kind, run)
            if sub is None:
                return None
            pieces.extend(sub)
        out, pos = [], 0
        for run in _runs(kind, fine, sizes):
            group = pieces[pos:pos + len(run)]
            pos += len(run)
            if len(group) == 1:
                out.append(self.find(group[0]))
            else:
                holder = self.new(math.prod(run) if kind == "prod" else sum(run))
                self.split[holder] = (kind, group)
                out.append(holder)
        return out

    # -- reading ------------------------------------------------------------------------------------
    def leaf_coords(self, i: int) -> list[tuple[int, np.ndarray]]:
        """For each leaf occurrence under space i: (leaf root, coordinate of every index of i, -1 if absent)."""
        r = self.find(i)
        n = self.size[r]
        sp = self.split.get(r)
        if sp is None:
            return [(r, np.arange(n))]
        kind, kids = sp
        out = []
        if kind == "prod":
            sizes = [self.size[self.find(k)] for k in kids]
            idx = np.arange(n)
            stride = n
            for k, s in zip(kids, sizes):
                stride //= s
                coord = (idx // stride) % s
                for leaf, arr in self.leaf_coords(k):
                    out.append((leaf, arr[coord]))
        else:
            off = 0
            for k in kids:
                s = self.size[self.find(k)]
                for leaf, arr in self.leaf_coords(k):
                    full = np.full(n, -1, dtype=np.int64)
                    full[off:off + s] = arr
                    out.append((leaf, full))
                off += s
        return out

    def propagate_flags(self) -> None:
        """Frozen and inexact flags of a split space hold for all of its children (to a fixpoint)."""
        changed = True
        while changed:
            changed = False
            for r, (_, kids) in list(self.split.items()):
                r = self.find(r)
                for k in kids:
                    k = self.find(k)
                    if r in self.frozen and k not in self.frozen:
                        self.frozen[k] = self.frozen[r]
                        changed = True
                    if r in self.inexact and k not in self.inexact:
                        self.inexact.add(k)
                        changed = True


def _boundaries(kind: str, sizes: list[int]) -> list[int]:
    """Cut points: cumulative offsets for `cat`, suffix products (strides) for `prod`."""
    if kind == "cat":
        return list(np.cumsum(sizes)[:-1])
    out, acc = [], 1
    for s in reversed(sizes[1:]):
        acc *= s
        out.append(acc)
    return out


def _sizes_from_boundaries(kind: str, bounds: list[int], total: int) -> list[int] | None:
    if kind == "cat":
        cuts = [0, *bounds, total]
        return [b - a for a, b in zip(cuts, cuts[1:])]
    strides = [1, *bounds, total]
    out = []
    for a, b in zip(strides, strides[1:]):
        if b % a:
            return None
        out.append(b // a)
    return list(reversed(out))


def _runs(kind: str, fine: list[int], sizes: list[int]) -> list[list[int]]:
    """Partition `fine` into consecutive runs whose product (prod) or sum (cat) is each of `sizes`."""
    runs, pos = [], 0
    for s in sizes:
        run, acc = [], 1 if kind == "prod" else 0
        while acc != s:
            run.append(fine[pos])
            acc = acc * fine[pos] if kind == "prod" else acc + fine[pos]
            pos += 1
        runs.append(run)
    return runs
