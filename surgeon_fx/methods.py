"""One entry point for every pruning method: LLM Surgeon, its baselines and the re-implemented peers.

`prune_model(model, spec, calib, graph=None)` prunes in place and returns what it removed.  Structured results
are physically applied with the rewrite pass (the model comes back smaller); unstructured and N:M results are
masks applied to the dense weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from passes.curvature import collect_kfac
from passes.rewrite import ShrinkPlan, shrink
from passes.sparsegpt import sparsegpt
from passes.surgeon import PruneResult, SurgeonConfig, prune, pruned_layers
from passes.wanda import wanda
from surgeon_fx.graph import DependencyGraph

CURVATURE = {"surgeon": "kfac", "magnitude": "identity", "l-obd": "diag_a", "k-obd": "diag_ga"}
PEERS = ("sparsegpt", "wanda")
METHODS = tuple(CURVATURE) + PEERS
STRUCTURES = ("structured", "unstructured", "2:4", "4:8")


@dataclass(frozen=True)
class MethodSpec:
    """What to run. target: fraction of prunable parameters kept (ignored for N:M, which keeps n/m)."""

    method: str = "surgeon"
    structure: str = "structured"
    target: float = 0.8
    shots: int = 3
    fisher: str = "empirical"
    samples: int = 1
    update: str = "correlated"
    lora_rank: int = 0
    include_inexact: bool = False  # prune groups where removal != zeroing (residual through norms)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r}; choose from {', '.join(STRUCTURES)}")
        if self.method in PEERS and self.structure == "structured":
            raise ValueError(f"{self.method} prunes weights, not structures: use unstructured, 2:4 or 4:8")
        if self.structure in ("structured", "unstructured") and not 0.0 < self.target < 1.0:
            raise ValueError(f"target must be a fraction strictly between 0 and 1, not {self.target}")


@dataclass
class Pruned:
    """removed: group → unit indices (structured); masks: param → keep mask; plan: the rewrite (structured)."""

    removed: dict[str, list[int]] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    plan: ShrinkPlan | None = None
    logs: list = field(default_factory=list)
    kept: dict[str, float] = field(default_factory=dict)


def prunable_groups(graph: DependencyGraph, include_inexact: bool) -> list:
    return [g for g in graph.groups if g.exact or include_inexact]


def prune_model(model: nn.Module, spec: MethodSpec, calib: torch.Tensor, graph: DependencyGraph | None = None,
                checkpoint_dir: str | os.PathLike | None = None, progress=None,
                collect_curvature=None) -> Pruned:
    """Prune `model` in place with `spec` on calibration windows `calib` [n, L]; see the module docstring.

    collect_curvature(model, windows) -> {layer: KronFactors} replaces the default collection (KFAC methods).
    """
    nm = {"2:4": (2, 4), "4:8": (4, 8)}.get(spec.structure)
    if spec.method in PEERS:
        fn = sparsegpt if spec.method == "sparsegpt" else wanda
        kw = {"n_m": nm} if nm else {"sparsity": 1.0 - spec.target}
        masks = fn(model, calib, **kw, progress=progress if isinstance(progress, bool) else None)
        kept = {name: float(m.float().mean()) for name, m in masks.items()}
        return Pruned(masks={f"{k}.weight": v for k, v in masks.items()}, kept=kept)
    groups = None
    if spec.structure == "structured":
        if graph is None:
            raise ValueError("structured pruning needs the dependency graph")
        groups = prunable_groups(graph, spec.include_inexact)
        if not groups:
            raise ValueError("the model has no prunable groups: structured pruning cannot apply")
    config = SurgeonConfig(structure=spec.structure, target=spec.target, shots=spec.shots,
                           curvature=CURVATURE[spec.method], update=spec.update, lora_rank=spec.lora_rank,
                           seed=spec.seed)
    collect = collect_curvature
    if collect is None and (spec.fisher != "empirical" or spec.samples != 1):
        collect = partial(_collect, fisher=spec.fisher, samples=spec.samples,
                          layers=pruned_layers(model, groups))
    result: PruneResult = prune(model, calib, groups, config, collect_curvature=collect,
                                checkpoint_dir=checkpoint_dir,
                                progress=progress if callable(progress) else None)
    out = Pruned(removed=result.removed, masks=result.masks, logs=result.logs, kept=result.kept)
    if spec.structure == "structured":
        out.plan = shrink(model, graph, {g: u for g, u in result.removed.items() if u})
    return out


def _collect(model, windows, fisher, samples, layers):
    return collect_kfac(model, windows, layers=layers, fisher=fisher, samples=samples)
