"""SliceGPT-style slicing (after Ashkboos et al., 2024): rotate the residual stream onto its principal
components, then delete the weakest directions — rows and columns of every tensor that reads or writes it.

Pipeline on the residual group R of the dependency graph (every tensor with a residual dimension of size d):

1. **Covariance** of the normalised residual: for every RMSNorm whose input lies on R, u = x / rms(x) per token
   (u ∈ ℝᵈ, ‖u‖² = d), Σ = Σ_sites Σ_tokens uᵀu (d, d) over the calibration windows.
2. **Rotation** Q (d, d): eigenvectors of Σ, descending eigenvalues.  RMSNorm without a scale commutes with an
   orthogonal Q (rms(xQ) = rms(x)), so first each norm's scale s is absorbed into its consumers (W ← W diag(s)
   for every linear reading the norm's output; scale ← 1), then every tensor on R is contracted with Q along its
   residual dimension: inputs W (out, d) ← W Q, outputs W (d, in) ← Qᵀ W, biases b ← Qᵀ b, embeddings E ← E Q.
   The model computes exactly the same function afterwards (up to float rounding).
3. **Slicing**: keep the first `width` directions (the rewrite pass removes units width..d−1 of R).  A norm
   now averages over `width` channels instead of d; its scale becomes √(d ρ / width), ρ = the fraction of that
   site's Σ kept, so that the sliced norm output matches the unsliced one in expectation.

Differences from the paper, stated plainly: one rotation for the whole residual stream (the paper rotates each
block separately and inserts a Q_lᵀQ_{l+1} matrix on every skip connection, which changes the model's code);
RMSNorm models only (LayerNorm needs its mean subtraction folded into the writers first).  A norm whose consumer
shares its weight with a tensor on R elsewhere (the output head tied to the embedding) cannot absorb its scale;
it is followed by a (width, width) linear map Qᵀ diag(s) Q instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from surgeon_fx.passes.rewrite import ShrinkPlan, shrink
from surgeon_fx.evaluate import logits_of
from surgeon_fx.graph import DependencyGraph
from surgeon_fx.groups import Group


class SliceError(ValueError):
    """The model's residual stream cannot be sliced by this pass."""


@dataclass
class SliceResult:
    """width: kept residual channels of `d`; kept_energy: per norm site, the fraction ρ of its Σ kept;
    eigenvalues: Σ's spectrum (descending); plan: the rewrite's ShrinkPlan (None when width = d); tails: the norm
    sites now followed by a (width, width) linear map (`add_tail`), in the order they were added."""

    width: int
    d: int
    kept_energy: dict[str, float]
    eigenvalues: Tensor
    plan: ShrinkPlan | None = None
    tails: list[str] = field(default_factory=list)


def add_tail(model: nn.Module, site: str) -> nn.Linear:
    """Replace the norm at `site` by nn.Sequential(norm, Linear(w, w, bias=False)), w its width; returns the
    linear map (weights uninitialised: set them, or load them with the model's state dict)."""
    norm = model.get_submodule(site)
    width = norm.weight.shape[0]
    tail = nn.Linear(width, width, bias=False).to(device=norm.weight.device, dtype=norm.weight.dtype)
    parent, _, child = site.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Sequential(norm, tail))
    return tail


def residual_group(graph: DependencyGraph) -> Group:
    """The graph's residual-stream group (the one holding the token embedding)."""
    found = [g for g in graph.groups if g.kind == "residual"]
    if len(found) != 1:
        raise SliceError(f"expected one residual-stream group, found {len(found)}")
    return found[0]


def _is_rmsnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


def _norm_scale(norm: nn.Module, d: int) -> Tensor:
    """The per-channel scale s of a weight-only RMSNorm, measured: norm(c·√d·eᵢ)ᵢ / √d for a large c."""
    probe = torch.eye(d, dtype=norm.weight.dtype, device=norm.weight.device) * (1e3 * d ** 0.5)
    with torch.no_grad():
        return norm(probe).diagonal() / d ** 0.5


def _set_scale(norm: nn.Module, value: Tensor) -> None:
    """Make the measured scale equal `value` (handles `weight` and `1 + weight` parametrisations)."""
    with torch.no_grad():
        norm.weight.fill_(0.0)
        offset = _norm_scale(norm, norm.weight.numel())
        norm.weight.copy_(value.to(norm.weight.dtype) - offset)


def _norm_sites(model: nn.Module, group: Group) -> list[str]:
    names = {s.param.rpartition(".")[0] for u in group.units[:1] for s in u.slices}
    modules = dict(model.named_modules())
    sites = [n for n in sorted(names) if _is_rmsnorm(modules[n])]
    others = [n for n in sorted(names) if not _is_rmsnorm(modules[n])
              and isinstance(modules[n], (nn.LayerNorm, nn.GroupNorm))]
    if others:
        raise SliceError(f"{others[0]} is a {type(modules[others[0]]).__name__}: this pass slices RMSNorm models "
                         f"only (LayerNorm's mean subtraction is not folded)")
    if not sites:
        raise SliceError("no RMSNorm reads the residual stream")
    return sites


@torch.no_grad()
def _covariance_and_consumers(model: nn.Module, windows: Tensor, sites: list[str], batch_size: int):
    """Σ per site (float64, d × d) and, per site, the linear layers whose input is that norm's output."""
    modules = dict(model.named_modules())
    cov: dict[str, Tensor] = {}
    outputs: dict[int, tuple[str, Tensor]] = {}  # storage → (site, output kept alive: no storage reuse)
    consumers: dict[str, set[str]] = {s: set() for s in sites}
    hooks = []

    def norm_hook(name):
        def hook(mod, args, out):
            x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1])
            u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)
            cov[name] = cov.get(name, 0) + u.T @ u
            outputs[out.untyped_storage().data_ptr()] = (name, out)
        return hook

    def linear_hook(name):
        def hook(mod, args):
            hit = outputs.get(args[0].untyped_storage().data_ptr())
            if hit is not None:
                consumers[hit[0]].add(name)
        return hook

    for s in sites:
        hooks.append(modules[s].register_forward_hook(norm_hook(s)))
    for name, mod in modules.items():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(linear_hook(name)))
    try:
        for start in range(0, len(windows), batch_size):
            outputs.clear()
            logits_of(model, windows[start:start + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return cov, consumers


def _residual_dims(group: Group, skip: set[str]) -> dict[str, int]:
    """param → its residual dimension, for every tensor of the group except `skip`; checks that unit i holds
    index i of each tensor (the layout the rotation assumes)."""
    layout: dict[tuple[str, int], list[Tensor]] = {}
    for unit in group.units:
        for s in unit.slices:
            layout.setdefault((s.param, s.dim), []).append(s.index)
    dims = {}
    for (name, dim), indices in layout.items():
        if name in skip:
            continue
        if len(indices) != group.size or not torch.equal(torch.cat(indices), torch.arange(group.size)):
            raise SliceError(f"{name}: residual channels are not laid out one per index along dim {dim}")
        dims[name] = dim
    return dims


def _rotate(model: nn.Module, dims: dict[str, int], Q: Tensor) -> None:
    """Contract each tensor `dims` names with Q along its residual dimension, once per storage."""
    params = dict(model.named_parameters(remove_duplicate=False))
    done = set()
    for name, dim in dims.items():
        p = params[name]
        if id(p) in done:
            continue
        done.add(id(p))
        with torch.no_grad():
            moved = p.detach().to(torch.float64).movedim(dim, -1)
            p.copy_((moved @ Q).movedim(-1, dim).to(p.dtype))


def slice_residual(model: nn.Module, graph: DependencyGraph, windows: Tensor, width: int,
                   batch_size: int = 1) -> SliceResult:
    """Rotate and slice the residual stream of `model` in place to `width` channels (see the module docstring).

    windows: calibration token ids (n, length).  The graph must have been built from this model.
    """
    group = residual_group(graph)
    d = group.size
    if not 0 < width <= d:
        raise SliceError(f"width must be in 1..{d}, got {width}")
    sites = _norm_sites(model, group)
    dims = _residual_dims(group, skip={f"{site}.weight" for site in sites})
    modules = dict(model.named_modules())
    cov, consumers = _covariance_and_consumers(model, windows, sites, batch_size)
    idle = [site for site in sites if not consumers[site]]
    if idle:  # checked before anything changes
        raise SliceError(f"no linear layer reads the output of {idle[0]}")
    total = sum(cov.values())
    evals, evecs = torch.linalg.eigh(total)
    order = torch.argsort(evals, descending=True)
    evals, Q = evals[order], evecs[:, order]
    names_of: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names_of[id(p)] = names_of.get(id(p), 0) + 1
    tied = {i for i, n in names_of.items() if n > 1}
    tails: dict[str, Tensor] = {}
    for site in sites:
        norm = modules[site]
        scale = _norm_scale(norm, d).to(torch.float64)
        users = sorted(consumers[site])
        if any(id(modules[u].weight) in tied for u in users):
            tails[site] = Q.T @ torch.diag(scale) @ Q  # cannot absorb into a tied tensor: a linear map follows
        else:
            with torch.no_grad():
                for u in users:
                    w = modules[u].weight
                    w.copy_((w.to(torch.float64) * scale).to(w.dtype))
        _set_scale(norm, torch.ones(d, dtype=torch.float64))
    _rotate(model, dims, Q)
    kept = {s: float(torch.trace(Q[:, :width].T @ cov[s] @ Q[:, :width]) / torch.trace(cov[s])) for s in sites}
    plan = shrink(model, graph, {group.name: list(range(width, d))}) if width < d else None
    modules = dict(model.named_modules())
    for site in sites:
        _set_scale(modules[site], torch.full((width,), (d * kept[site] / width) ** 0.5, dtype=torch.float64))
    for site, M in tails.items():
        tail = add_tail(model, site)
        with torch.no_grad():
            tail.weight.copy_(M[:width, :width].T.to(tail.weight.dtype))
    return SliceResult(width, d, kept, evals, plan, list(tails))
