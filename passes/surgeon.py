"""The LLM Surgeon multi-shot driver: curvature → costs → global selection → correlated update, T times.

Shot t = 1..T (targets from `threshold.shot_targets`, linear from 1 to `target`):

1. re-estimate the curvature of the current (already pruned and updated) model with `collect_curvature`;
2. damp and invert each factor (`baselines.layer_curvature`; the method picks KFAC or a baseline);
3. price every candidate (`costs`): weights (unstructured, N:M) or units of the groups (structured);
4. select: a global threshold on raw costs (unstructured), per-block N:M (semi-structured, the M−N removed
   per block grow linearly with t; chosen during the update's column sweep, `_nm_removed`), cheapest units per removed parameter (structured, `threshold.select_units`);
5. update the remaining weights (`update`), with earlier removals kept as constraints, and re-apply every mask
   so removed weights stay exactly zero;
6. optionally train and absorb masked low-rank corrections (`lora`);
7. checkpoint the whole state atomically; a run started again with the same `checkpoint_dir` and config
   resumes after the last finished shot and ends bitwise identical to an uninterrupted run.

Targets are fractions of *prunable* parameters kept by default (`target_of="prunable"`: the weights of the
pruned layers, or for structured pruning every parameter the groups touch); `target_of="all"` counts every
parameter of the model, the non-prunable ones as always kept.

A structured shot streams: one layer at a time its factors go to the compute device, are damped and inverted
(float64 W, A, A⁻¹, G, G⁻¹: the layer's workspace) and priced, and only the [U] unit costs stay; after the global
selection each changed layer is loaded again (the same deterministic factorisation) and updated.  So the device
holds the model, one batch's activations during collection and one layer's workspace during the shot; the
factors of the other layers wait where `collect_curvature` left them (`passes.factor_store`: CPU memory or
files).  The result equals pricing every layer at once (`costs.unit_costs`) bit for bit.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from surgeon_fx.passes.baselines import is_diagonal, layer_curvature, needs_data
from surgeon_fx.layers import CONV2D, kind_of
from surgeon_fx.passes.blocks import from_matrix, read_matrix, to_matrix, unit_blocks, write_matrix
from surgeon_fx.passes.costs import element_costs, layer_unit_costs
from surgeon_fx.passes.curvature import KronFactors, collect_kfac, default_layers
from surgeon_fx.passes.lora import lora_correct
from surgeon_fx.passes.sparsegpt import sparsegpt_prune_layer
from surgeon_fx.passes.threshold import global_masks, nm_removed, select_units, shot_targets
from surgeon_fx.passes.update import remove_rows_cols, sweep_update
from surgeon_fx.groups import Group, param_name, prunable_params, unit_sizes
from surgeon_fx.structure import Structure

UPDATES = ("correlated", "consumer", "none")
NM_SELECTS = ("sequential", "fixed")  # N:M choice made during the column sweep, or on the weights as they are
CHECKPOINT = "surgeon_state.pt"
SELECT_ROUNDS = 8  # selections per structured shot at most (see `_structured_shot`)


class CheckpointMismatch(ValueError):
    """A checkpoint written with another config than the run that tries to resume from it."""


@dataclass
class SurgeonConfig:
    """What to prune and how.

    structure: a `Structure` or its name ("unstructured", "N:M", "structured": needs groups).
    target: fraction kept at the end (ignored for N:M, where it is n/m); shots: T; schedule: "linear".
    curvature: "kfac" (LLM Surgeon) | "identity" (magnitude) | "diag_a" (L-OBD) | "diag_ga" (K-OBD).
    update: "correlated" | "consumer" | "none" (baselines have diagonal curvature: their update is zeroing).
    Structured "correlated" applies the block-diagonal optimum to every layer a unit touches: row updates in the
    producers (via G) *and* column updates in the consumers (via A).  For a unit that removes both (a neuron:
    gate/up rows and the down column; a head: Q/K/V rows and O columns) each side compensates the same lost
    signal, so the two updates add up to an overcompensation.  "consumer" keeps only the column updates for
    such units (a unit with no column in a curved layer still gets its row update); for unstructured and N:M
    it is the same as "correlated".
    damp_a / damp_g: relative damping (× mean diagonal); damp_g None → 0.1 for unstructured and N:M, 0.01
    for structured (the paper's defaults).  target_of: "prunable" | "all".  per_param: rank structured units
    by cost per removed parameter (True) or by raw cost.  lora_rank 0 = no low-rank corrections.
    nm_select: the N:M choice, "sequential" (made during the column sweep on the compensated weights, as
    SparseGPT does; KFAC with an update only) or "fixed" (on the weights before the shot); see `_nm_removed`.
    """

    structure: Structure | str = "unstructured"
    target: float = 0.5
    shots: int = 5
    schedule: str = "linear"
    curvature: str = "kfac"
    update: str = "consumer"
    damp_a: float = 0.01
    damp_g: float | None = None
    target_of: str = "prunable"
    per_param: bool = True
    lora_rank: int = 0
    lora_steps: int = 20
    lora_lr: float = 1e-3
    nm_select: str = "sequential"
    seed: int = 0

    def __post_init__(self):
        self.structure = Structure.parse(self.structure)
        self.structure.check_target(self.target)
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, not {self.update!r}")
        if self.nm_select not in NM_SELECTS:
            raise ValueError(f"nm_select must be one of {NM_SELECTS}, not {self.nm_select!r}")
        if self.target_of not in ("prunable", "all"):
            raise ValueError(f"target_of must be 'prunable' or 'all', not {self.target_of!r}")
        needs_data(self.curvature)
        shot_targets(self.structure.kept(self.target), self.shots, self.schedule)

    def g_damping(self) -> float:
        return self.damp_g if self.damp_g is not None else (0.01 if self.structure.structured else 0.1)


@dataclass
class ShotLog:
    """One shot: target and achieved kept fractions, summed estimated cost of what it removed, seconds."""

    shot: int
    target: float
    achieved: float
    cost: float
    seconds: float
    lora_loss: tuple[float, float] | None = None


@dataclass
class PruneResult:
    """masks: param name → bool keep-mask (storage shape); removed: group → removed unit indices (structured);
    logs: one per shot; kept: layer name → kept fraction of its weight."""

    masks: dict[str, Tensor]
    removed: dict[str, list[int]]
    logs: list[ShotLog]
    kept: dict[str, float]


@dataclass
class _State:
    shot: int
    masks: dict[str, Tensor]
    removed: dict[str, list[int]]
    logs: list[ShotLog] = field(default_factory=list)


def prune(model: nn.Module, calib_windows: Tensor, groups: list[Group] | None, config: SurgeonConfig,
          collect_curvature: Callable[[nn.Module, Tensor], dict] | None = None,
          checkpoint_dir: str | os.PathLike | None = None,
          progress: Callable[[ShotLog], None] | None = None, device=None) -> PruneResult:
    """Prune `model` in place in `config.shots` shots; see the module docstring.

    groups: required for structure "structured" (ignored otherwise).  collect_curvature(model, windows) →
    {layer name: KronFactors} (any mapping, e.g. a `FactorStore`); default `collect_kfac` on the pruned layers.
    device: where a structured shot computes each layer's workspace (None: the device of the layer's weight).
    The global torch RNG is forked: the caller's RNG state is unchanged.
    """
    structured = config.structure.structured
    if structured and not groups:
        raise ValueError("structured pruning needs the groups of the dependency graph")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    layers = pruned_layers(model, groups if structured else None)
    collect = collect_curvature or partial(collect_kfac, layers=layers)
    if structured:
        curved = set(layers)
        blocks = {g.name: [unit_blocks(u, modules, curved) for u in g.units] for g in groups}
        touching = {name: [g for g in groups if any(name in b.rows or name in b.cols for b in blocks[g.name])]
                    for name in layers}
        sizes = unit_sizes(model, groups)  # parameters only, each tied tensor under its first name
        prunable = prunable_params(model, groups)
    else:
        prunable = [param_name(name) for name in layers]
    n_prunable = sum(params[n].numel() for n in prunable)
    n_fixed = sum(p.numel() for p in model.parameters()) - n_prunable if config.target_of == "all" else 0
    targets = shot_targets(config.structure.kept(config.target), config.shots, config.schedule)

    state = _State(0, {n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable},
                   {g.name: [] for g in groups} if structured else {})
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    rng = _resume(path, model, config, state) if path is not None and path.exists() else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if rng is not None:
            torch.set_rng_state(rng)
        for t in range(state.shot, config.shots):
            start = time.perf_counter()
            factors = collect(model, calib_windows) if needs_data(config.curvature) else {}
            kept_target = round(targets[t] * (n_prunable + n_fixed)) - n_fixed
            if structured:
                cost, target = _structured_shot(modules, layers, factors, groups, blocks, touching, sizes, state,
                                                config, kept_target, device), targets[t]
            else:
                curv = {name: _curvature(modules[name], factors.get(name), config, name) for name in layers}
                cost, nm_target = _sparse_shot(modules, layers, curv, state, config, t, n_prunable - kept_target)
                target = targets[t] if nm_target is None else nm_target
                del curv
            del factors
            _apply_masks(params, state.masks)
            lora = None
            if config.lora_rank > 0:
                losses = lora_correct(model, calib_windows, [n for n in layers if kind_of(modules[n]) is not CONV2D],
                                      state.masks, config.lora_rank, config.lora_steps, config.lora_lr,
                                      seed=config.seed + t)
                lora = (losses[0], losses[-1]) if losses else None
            kept = sum(int(m.sum()) for m in state.masks.values())
            log = ShotLog(t + 1, target, (kept + n_fixed) / (n_prunable + n_fixed), cost,
                          time.perf_counter() - start, lora)
            state.logs.append(log)
            state.shot = t + 1
            if path is not None:
                _checkpoint(path, model, config, state)
            if progress is not None:
                progress(log)
    kept_frac = {name: float(state.masks[param_name(name)].float().mean()) if param_name(name) in state.masks
                 else 1.0 for name in layers}
    return PruneResult({n: m.clone() for n, m in state.masks.items()},
                       {g: sorted(v) for g, v in state.removed.items()}, state.logs, kept_frac)


def pruned_layers(model: nn.Module, groups: list[Group] | None) -> list[str]:
    """Layers that get curvature: `default_layers` (no output head, no tied embedding); for structured pruning
    only those whose weight or bias some group touches."""
    layers = default_layers(model)
    if groups is None:
        return layers
    touched = {p.rpartition(".")[0] for g in groups for p in g.params()}
    return [name for name in layers if name in touched]


def _curvature(module: nn.Module, factors, config: SurgeonConfig, name: str):
    """Damped curvature of one layer for the configured method."""
    M = to_matrix(module, module.weight, module.bias)
    return layer_curvature(config.curvature, M.shape[0], M.shape[1], factors, config.damp_a,
                           config.g_damping(), name)


def _sparse_shot(modules, layers, curv, state: _State, config: SurgeonConfig, t: int, n_remove: int):
    """Unstructured / N:M shot: select weights from the KFAC costs, update the rest, store masks.

    The selection (global threshold on `element_costs`, or per-block N:M by `_nm_removed`) comes first; the
    update is `sweep_update` (one shared factor of A per layer; see `passes.update` for how it relates to
    the exact per-row rule `rowwise_update`).  Returns (estimated cost of the removed weights, kept fraction n_keep/m of this N:M shot or None)."""
    costs, before = {}, {}
    for name in layers:
        m, c = modules[name], curv[name]
        W = to_matrix(m, m.weight.detach(), None).to(torch.float64)
        costs[name] = element_costs(W, c.G_inv.diagonal(), c.A_inv.diagonal())
        before[name] = ~to_matrix(m, state.masks[param_name(name)], None)
    pattern = config.structure.nm
    if pattern is None:
        after = global_masks(costs, before, n_remove)
        target = None
    else:
        n, mm = pattern
        n_keep = mm - round((mm - n) * (t + 1) / config.shots)
        for name in layers:
            if costs[name].shape[1] % mm:
                raise ValueError(f"layer {name!r} has {costs[name].shape[1]} inputs, not a multiple of {mm}")
        after = {name: _nm_removed(modules[name], curv[name], costs[name], before[name], n_keep, mm, config)
                 for name in layers}
        target = n_keep / mm
    cost = 0.0
    for name in layers:
        m = modules[name]
        cost += float(costs[name][after[name] & ~before[name]].sum())
        M = read_matrix(m)
        removed = torch.zeros_like(M, dtype=torch.bool)
        removed[:, : after[name].shape[1]] = after[name]
        if config.update != "none" and not is_diagonal(config.curvature):
            M = sweep_update(M, curv[name].A, removed)
        else:
            M = M.masked_fill(removed, 0.0)
        write_matrix(m, M)
        state.masks[param_name(name)] = from_matrix(m, ~removed)[0]
    return cost, target


def _nm_removed(module: nn.Module, curv, costs: Tensor, before: Tensor, n_keep: int, m: int,
                config: SurgeonConfig) -> Tensor:
    """Removed mask (W's shape) keeping `n_keep` of every `m` inputs per row.

    "fixed": by the element costs w² / (G⁻¹_ii A⁻¹_jj) of the weights as they are.  "sequential" (KFAC with an
    update only): within a row G⁻¹_ii is one factor for all candidates, so the choice is A's alone, and it is
    made as the column sweep reaches each group of m inputs, on the weights already compensated for the
    earlier columns, with the conditional score w² / U_jj² (A⁻¹ = Uᵀ U): SparseGPT's adaptive selection,
    `sparsegpt_prune_layer` on A's block of the weight columns (a bias column, never removed, is left out of
    the choice; the update that follows uses all of A).
    """
    if config.nm_select == "fixed" or is_diagonal(config.curvature) or config.update == "none":
        return nm_removed(costs, before, n_keep, m)
    W = to_matrix(module, module.weight.detach(), None)
    cols = W.shape[1]
    _, keep = sparsegpt_prune_layer(W, curv.A[:cols, :cols], n_m=(n_keep, m), percdamp=0.0, removed=before)
    return ~keep


def _structured_shot(modules, layers, factors, groups, blocks, touching, sizes, state: _State,
                     config: SurgeonConfig, kept_target: int, device) -> float:
    """Structured shot, one layer at a time: price units, select, update each changed layer, mask every slice.

    Returns the cost.  Unit sizes are `Unit.numel`, which counts again the entries a unit shares with units of
    other groups (a KV head holds the slices of its query heads, which the query-head group holds too), so one
    selection can remove less than asked.  Selection therefore repeats, each round asked for what the masks
    still lack, until it lands (at most `SELECT_ROUNDS` rounds; sizes only over-count, so a round never
    overshoots by more than `select_units` allows).  touching: layer → the groups with a unit holding rows or
    columns of it.
    """
    costs = {g.name: torch.zeros(len(g.units), dtype=torch.float64, device=device) for g in groups}
    for name in layers:
        if not touching[name]:
            continue
        M, c = _workspace(modules[name], factors, config, name, device)
        for g in touching[name]:
            costs[g.name] = costs[g.name] + layer_unit_costs(blocks[g.name], name, M, c).to(costs[g.name].device)
        del M, c
    scores = {}
    for g in groups:
        size = torch.tensor(sizes[g.name], dtype=torch.float64, device=costs[g.name].device).clamp_min(1)
        scores[g.name] = costs[g.name] / size if config.per_param else costs[g.name]
    cost = 0.0
    for _ in range(SELECT_ROUNDS):
        kept_now = sum(int(m.sum()) for m in state.masks.values())
        new = select_units(scores, sizes, {g: set(v) for g, v in state.removed.items()}, kept_now - kept_target,
                           {g.name: g.min_keep for g in groups}, {g.name: g.multiple for g in groups})
        if not any(new.values()):
            break
        cost += sum(float(costs[g][u]) for g, units in new.items() for u in units)
        for g in groups:
            state.removed[g.name].extend(new[g.name])
            for u in new[g.name]:
                for s in g.units[u].slices:
                    if s.param in state.masks:
                        state.masks[s.param].index_fill_(s.dim, s.index.to(state.masks[s.param].device), False)
    curved = config.update != "none" and not is_diagonal(config.curvature)
    for name in layers:
        rows, cols = _removed_blocks(name, groups, blocks, state.removed)
        if not rows.numel() and not cols.numel():
            continue
        if curved:
            M, c = _workspace(modules[name], factors, config, name, device)
            rows, cols = rows.to(M.device), cols.to(M.device)
            updated = (_removed_blocks(name, groups, blocks, state.removed, producers_only=True)[0].to(M.device)
                       if config.update == "consumer" else rows)
            M = remove_rows_cols(M, c.G_inv, c.A_inv, updated, cols)
            del c
            M[rows] = 0
        else:
            M = _read(modules[name], device)
            rows, cols = rows.to(M.device), cols.to(M.device)
            M[rows] = 0
            M[:, cols] = 0
        write_matrix(modules[name], M)
        del M
    return cost


def _read(module: nn.Module, device) -> Tensor:
    """The layer's float64 matrix M (out, in') on `device` (None: where its weight is)."""
    M = read_matrix(module)
    return M if device is None else M.to(device)


def _workspace(module: nn.Module, factors, config: SurgeonConfig, name: str, device):
    """One layer's float64 workspace on the compute device: (M, damped curvature with inverses)."""
    M = _read(module, device)
    f = factors.get(name)
    if f is not None:
        f = KronFactors(f.A.to(M.device), f.G.to(M.device), f.tokens)
    return M, _curvature(module, f, config, name)


def _removed_blocks(name: str, groups, blocks, removed, producers_only: bool = False) -> tuple[Tensor, Tensor]:
    """Union of the rows and of the columns of layer `name` held by every removed unit (producers_only: only
    the units that remove no column of any curved layer)."""
    rows, cols = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for g in groups:
        for u in removed[g.name]:
            b = blocks[g.name][u]
            if producers_only and b.cols:
                continue
            if name in b.rows:
                rows.append(b.rows[name])
            if name in b.cols:
                cols.append(b.cols[name])
    return torch.unique(torch.cat(rows)), torch.unique(torch.cat(cols))


@torch.no_grad()
def _apply_masks(params: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    for name, keep in masks.items():
        params[name].mul_(keep)


def _checkpoint(path: Path, model: nn.Module, config: SurgeonConfig, state: _State) -> None:
    """Write the state after a finished shot to a temporary file, then rename it over `path` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"config": asdict(config), "shot": state.shot, "model": model.state_dict(), "masks": state.masks,
                "removed": state.removed, "logs": [asdict(log) for log in state.logs],
                "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def _resume(path: Path, model: nn.Module, config: SurgeonConfig, state: _State) -> Tensor:
    """Load a checkpoint into `model` and `state`; returns the saved RNG state."""
    ck = torch.load(path, weights_only=True)
    if ck["config"] != asdict(config):
        raise CheckpointMismatch(f"checkpoint {path} was written with a different config: {ck['config']}")
    model.load_state_dict(ck["model"])
    state.shot, state.masks, state.removed = ck["shot"], ck["masks"], ck["removed"]
    state.logs = [ShotLog(**{**log, "lora_loss": tuple(log["lora_loss"]) if log["lora_loss"] else None})
                  for log in ck["logs"]]
    return ck["rng"]
