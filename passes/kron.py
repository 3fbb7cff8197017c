"""Kronecker-factored curvature helpers: damped factorisations and the nearest Kronecker product.

Conventions (shared with `passes/curvature.py`):

* A weight `W` has shape (out, in') where in' counts a bias column and, for a conv, in·kh·kw.
* Kronecker factors are `G` [out, out] and `A` [in', in']; vec is row-major (`W.reshape(-1)`), so
  `(G ⊗ A) vec(W) = vec(G W A)` for symmetric A, and `torch.kron(G, A)` is the dense [out·in', out·in'] matrix.
* A Fisher given by per-example gradient matrices `grads` [N, out, in'] is
  `F = (1/norm) Σ_n vec(∇W_n) vec(∇W_n)ᵀ` (norm defaults to N).

Van Loan–Pitsianis: rearranging F so that entry F[(o,i),(p,j)] moves to R(F)[(o,p),(i,j)] turns
‖F − G ⊗ A‖_F into ‖R(F) − vec(G) vec(A)ᵀ‖_F, a rank-1 approximation problem.  Applied to a factor, R(F)
and its transpose are

    R(A)  = (1/norm) Σ_n ∇W_n A ∇W_nᵀ      (in'×in' → out×out)
    Rᵀ(G) = (1/norm) Σ_n ∇W_nᵀ G ∇W_n      (out×out → in'×in')

and the minimiser of ‖F − G ⊗ A‖_F for fixed A is `G = R(A) / ‖A‖²` (and symmetrically for A).  Alternating
these least-squares updates is the power iteration on R(F) (the paper's Algorithm 4); each half-step can only
lower the error, so it never ends worse than its start.  When every ∇W_n = g_n a_nᵀ has rank one (per-token
examples) the maps reduce to `R(A) = (1/norm) Σ_n (a_nᵀ A a_n) g_n g_nᵀ`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


class CurvatureError(RuntimeError):
    """A curvature factor that cannot be factorised (non-finite, or indefinite even with maximal damping)."""


def damped_cholesky(M: Tensor, rel_damp: float, max_tries: int = 6, name: str = "") -> tuple[Tensor, float]:
    """Lower Cholesky factor L of `M + λ·mean(diag M)·I`, escalating λ when the factorisation fails.

    M: symmetric [d, d] (factorised in its own dtype; pass float64 for the paper's precision).
    Starts at λ = rel_damp and multiplies λ by 10 after each failure (a zero start escalates to 1e-8 first),
    at most `max_tries` factorisations.  Returns (L [d, d], λ used — relative to mean(diag M)).
    Raises CurvatureError naming `name` when M is non-finite or every try fails.
    """
    label = f" for layer {name!r}" if name else ""
    if not torch.isfinite(M).all():
        raise CurvatureError(f"curvature factor{label} has non-finite entries; no damping can fix that")
    mean_diag = M.diagonal().mean()
    scale = mean_diag if mean_diag > 0 else M.new_tensor(1.0)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    damp = float(rel_damp)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(M + (damp * scale) * eye)
        if int(info) == 0 and torch.isfinite(L).all():
            return L, damp
        damp = damp * 10.0 if damp > 0 else 1e-8
    raise CurvatureError(f"Cholesky of curvature factor{label} [{M.shape[0]}x{M.shape[0]}] failed "
                         f"{max_tries} times (last relative damping tried {damp / 10:g})")


def damped_inverse(M: Tensor, rel_damp: float, max_tries: int = 6, name: str = "") -> tuple[Tensor, float]:
    """(M + λ·mean(diag M)·I)⁻¹ via `damped_cholesky`; returns (inverse [d, d], λ used)."""
    L, damp = damped_cholesky(M, rel_damp, max_tries, name)
    inv = torch.cholesky_inverse(L)
    if not torch.isfinite(inv).all():
        label = f" for layer {name!r}" if name else ""
        raise CurvatureError(f"inverse of curvature factor{label} is non-finite (relative damping {damp:g})")
    return inv, damp


def apply_rg(grads: Tensor, A: Tensor) -> Tensor:
    """Σ_n ∇W_n A ∇W_nᵀ for grads [N, out, in'] and A [in', in'] → [out, out] (unnormalised)."""
    return (grads @ A @ grads.transpose(1, 2)).sum(0)


def apply_ra(grads: Tensor, G: Tensor) -> Tensor:
    """Σ_n ∇W_nᵀ G ∇W_n for grads [N, out, in'] and G [out, out] → [in', in'] (unnormalised)."""
    return (grads.transpose(1, 2) @ G @ grads).sum(0)


GradSource = Callable[[], Iterable[Tensor]]


def _as_source(grads: Tensor | GradSource) -> GradSource:
    if isinstance(grads, Tensor):
        return lambda: (grads,)
    return grads


def _deflated(fn, src: GradSource, M: Tensor, comps: list[tuple[Tensor, Tensor]], side: str, norm: float):
    """One normalised rearranged map, minus the contribution of the components already found.

    side "G": R(A) − Σ_j G_j ⟨A_j, A⟩ ; side "A": Rᵀ(G) − Σ_j A_j ⟨G_j, G⟩.
    """
    out = sum(fn(chunk, M) for chunk in src()) / norm
    for G_j, A_j in comps:
        out = out - (G_j * (A_j * M).sum() if side == "G" else A_j * (G_j * M).sum())
    return out


def nearest_kron(grads: Tensor | GradSource, rank: int = 1, iters: int = 20, init: tuple[Tensor, Tensor] | None = None,
                 norm: float | None = None, tol: float = 1e-7) -> list[tuple[Tensor, Tensor]]:
    """Rank-`rank` sum Σ_r G_r ⊗ A_r nearest (Frobenius) to F = (1/norm) Σ_n vec(∇W_n) vec(∇W_n)ᵀ.

    grads: [N, out, in'] per-example gradient matrices, or a zero-argument callable yielding chunks
    [n_i, out, in'] (called once per half-step, so F is never formed and the gradients may be streamed).
    norm: the 1/norm of F (default: N, counted on the first pass).
    init: (G0, A0) warm start of the first component (e.g. classic KFAC); without it A0 = I.  The first
    half-step updates A from G0 (or G from A0 = I), then G and A alternate for `iters` full steps or until the
    relative change of G ⊗ A is below `tol`.  Later components use deflation (F minus the earlier ones) and
    start from A = I plus a small deterministic non-symmetric perturbation (a later component of the optimal sum
may pair antisymmetric factors, which a symmetric start could never reach).
    Returns [(G_r [out, out], A_r [in', in'])], the least-squares pair for each component.
    """
    src = _as_source(grads)
    if norm is None:
        norm = float(sum(chunk.shape[0] for chunk in src()))
    first = next(iter(src()))
    out_dim, in_dim = first.shape[1], first.shape[2]
    opts = dict(dtype=first.dtype, device=first.device)
    comps: list[tuple[Tensor, Tensor]] = []
    gen = torch.Generator().manual_seed(0)
    for r in range(rank):
        if r == 0 and init is not None:
            G = init[0].to(**opts)
            A = _deflated(apply_ra, src, G, comps, "A", norm) / (G * G).sum()
        else:
            A = torch.eye(in_dim, **opts) + 1e-2 * torch.randn(in_dim, in_dim, generator=gen).to(**opts)
            G = torch.zeros(out_dim, out_dim, **opts)
        for _ in range(iters):
            G_old, A_old = G, A
            G = _deflated(apply_rg, src, A, comps, "G", norm) / (A * A).sum().clamp_min(1e-300)
            A = _deflated(apply_ra, src, G, comps, "A", norm) / (G * G).sum().clamp_min(1e-300)
            change = _kron_dist(G, A, G_old, A_old)
            if change <= tol * (G * G).sum().sqrt() * (A * A).sum().sqrt():
                break
        comps.append((G, A))
    return comps


def _kron_dist(G1: Tensor, A1: Tensor, G2: Tensor, A2: Tensor) -> Tensor:
    """‖G1 ⊗ A1 − G2 ⊗ A2‖_F without forming either product (uses ⟨G⊗A, H⊗B⟩ = ⟨G,H⟩⟨A,B⟩)."""
    sq = (G1 * G1).sum() * (A1 * A1).sum() + (G2 * G2).sum() * (A2 * A2).sum() - 2 * (G1 * G2).sum() * (A1 * A2).sum()
    return sq.clamp_min(0).sqrt()


# -- dense references: tests and bench/fisher_approx_table.py only (tiny layers) --------------------------------
def dense_fisher(grads: Tensor, norm: float | None = None) -> Tensor:
    """F = (1/norm) Σ_n vec(∇W_n) vec(∇W_n)ᵀ, dense [out·in', out·in'] — for tiny layers (tests, tables)."""
    flat = grads.reshape(grads.shape[0], -1)
    return flat.T @ flat / (grads.shape[0] if norm is None else norm)


def kron_sum(comps: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Σ_r G_r ⊗ A_r as a dense matrix — for tiny layers only."""
    return sum(torch.kron(G, A) for G, A in comps)
