"""Which curvature a pruning method uses: LLM Surgeon (KFAC) and the paper's baselines.

Following the paper's framework, every method is the same constrained quadratic problem with a different F:

    "kfac"     LLM Surgeon  F = G ⊗ A
    "identity" magnitude    F = I ⊗ I           (cost ∝ θ²; needs no data)
    "diag_a"   L-OBD        F = diag(I ⊗ A) = I ⊗ diag(A)
    "diag_ga"  K-OBD        F = diag(G ⊗ A) = diag(G) ⊗ diag(A)

With a diagonal F the optimal update F⁻¹Eᵀ(EF⁻¹Eᵀ)⁻¹Eθ is non-zero only on the removed weights themselves,
so for the three baselines "correlated update" and "no update" coincide: pruning is just zeroing.

Damping: each factor gets λ·mean(diag) added to its diagonal (relative damping, escalated by
`passes.kron.damped_cholesky` when the Cholesky fails); one Cholesky per factor gives both the damped factor
(L Lᵀ) and its inverse, so costs and updates use exactly the same damped F.  Everything is float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from surgeon_fx.passes.kron import damped_cholesky

CURVATURES = ("kfac", "identity", "diag_a", "diag_ga")  # LLM Surgeon, magnitude, L-OBD, K-OBD


@dataclass
class LayerCurvature:
    """Damped factors of one layer (float64): A, A_inv [in', in'], G, G_inv [out, out]; damping actually used."""

    A: Tensor
    A_inv: Tensor
    G: Tensor
    G_inv: Tensor
    damp_a: float
    damp_g: float


def needs_data(method: str) -> bool:
    """True when the method needs KFAC factors from calibration data (all but magnitude)."""
    if method not in CURVATURES:
        raise ValueError(f"curvature method must be one of {CURVATURES}, not {method!r}")
    return method != "identity"


def is_diagonal(method: str) -> bool:
    """True for the baselines, whose correlated update reduces to zeroing."""
    needs_data(method)  # validates the name
    return method != "kfac"


def _damped(M: Tensor, rel_damp: float, name: str) -> tuple[Tensor, Tensor, float]:
    """(M + λ mean(diag) I, its inverse, λ) from one Cholesky, in float64."""
    L, damp = damped_cholesky(M.to(torch.float64), rel_damp, name=name)
    return L @ L.t(), torch.cholesky_inverse(L), damp


def _diag(d: Tensor, rel_damp: float) -> tuple[Tensor, Tensor, float]:
    """Damped diagonal matrix and its inverse from a diagonal d (float64)."""
    d = d.to(torch.float64)
    mean = d.mean()
    d = d + rel_damp * (mean if mean > 0 else 1.0)
    if not (d > 0).all():
        raise ValueError("diagonal curvature has non-positive entries after damping")
    return torch.diag(d), torch.diag(1.0 / d), rel_damp


def layer_curvature(method: str, out_dim: int, in_dim: int, factors=None, damp_a: float = 0.01,
                    damp_g: float = 0.01, name: str = "") -> LayerCurvature:
    """The damped curvature of one layer (out_dim × in_dim matrix view) for `method`.

    factors: an object with `.A` [in_dim, in_dim] and `.G` [out_dim, out_dim] (`passes.curvature.KronFactors`);
    ignored (may be None) for "identity".
    """
    if needs_data(method) and factors is None:
        raise ValueError(f"method {method!r} needs curvature factors for layer {name!r}")
    if method == "identity":
        A, A_inv, da = _diag(torch.ones(in_dim), damp_a)
        G, G_inv, dg = _diag(torch.ones(out_dim), damp_g)
    elif method == "diag_a":
        A, A_inv, da = _diag(factors.A.diagonal(), damp_a)
        G, G_inv, dg = _diag(torch.ones(out_dim), damp_g)
    elif method == "diag_ga":
        A, A_inv, da = _diag(factors.A.diagonal(), damp_a)
        G, G_inv, dg = _diag(factors.G.diagonal(), damp_g)
    else:
        A, A_inv, da = _damped(factors.A, damp_a, name + ".A")
        G, G_inv, dg = _damped(factors.G, damp_g, name + ".G")
    if A.shape != (in_dim, in_dim) or G.shape != (out_dim, out_dim):
        raise ValueError(f"layer {name!r}: factors A {tuple(A.shape)}, G {tuple(G.shape)} do not match "
                         f"its ({out_dim}, {in_dim}) matrix view")
    return LayerCurvature(A, A_inv, G, G_inv, da, dg)
