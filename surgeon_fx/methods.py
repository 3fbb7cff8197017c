"""The method registry: each pruning method's name → what it supports and the function that runs it.

A method is chosen once, by `resolve(recipe)`, which validates method × structure × options; the pipeline then
calls `method.run(model, recipe, groups, calib, ctx)` and gets an `Outcome` (masks, removed units, shot logs).
Adding a method is one entry in `METHODS`:

| method              | structures                 | how                                                         |
|---------------------|----------------------------|-------------------------------------------------------------|
| surgeon             | structured, unstructured, N:M | multi-shot driver, KFAC curvature (`passes.surgeon`)     |
| magnitude, l-obd, k-obd | the same               | the same driver with the baselines' curvatures (no data for magnitude) |
| sparsegpt, wanda    | unstructured, N:M          | one pass over the blocks of a causal LM (`passes.sequential`) |
| flap, wanda-sp      | structured                 | unit scores from block input statistics of a causal LM (`passes.flap`, `passes.wanda_sp`) |
| slicegpt            | structured                 | residual stream rotated (PCA), round(target × d) kept (`passes.slicegpt`) |
"""
from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from surgeon_fx.graph import DependencyGraph
from surgeon_fx.groups import Group, param_name
from surgeon_fx.layers import is_linear, matrix_kind
from surgeon_fx.passes.curvature import collect_kfac, default_layers
from surgeon_fx.passes.flap import flap
from surgeon_fx.passes.rewrite import ShrinkPlan
from surgeon_fx.passes.factor_store import FactorStore
from surgeon_fx.passes.offload import offloaded
from surgeon_fx.passes.sequential import find_blocks
from surgeon_fx.passes.slicegpt import SliceError, residual_group, slice_residual
from surgeon_fx.passes.sparsegpt import sparsegpt
from surgeon_fx.passes.surgeon import SurgeonConfig, prune, pruned_layers
from surgeon_fx.passes.wanda import wanda
from surgeon_fx.passes.wanda_sp import wanda_sp
from surgeon_fx.recipe import Recipe, RecipeError


@dataclass(frozen=True)
class RunContext:
    """How a method runs, beyond the recipe.  loss: the model file's `loss(model, batch)` (non-LM models);
    checkpoint_dir: where the multi-shot driver checkpoints (None: none); progress: tqdm bars; on_shot(done: int,
    total: int) is called after each shot; collect_curvature(model, windows) replaces the default KFAC collection;
    lines(text) is told of every finished curvature pass and shot (`surgeon_fx.progress.Progress.line`)."""

    device: Any = "cpu"
    loss: Callable | None = None
    checkpoint_dir: Path | None = None
    progress: bool = False
    on_shot: Callable[[int, int], None] | None = None
    collect_curvature: Callable | None = None
    lines: Callable[[str], None] | None = None
    graph: DependencyGraph | None = None


@dataclass
class Outcome:
    """masks: param → keep-mask (storage shape); removed: group → removed unit indices (structured);
    shots: one log dict per shot (multi-shot methods); plan: set by a method that rewrote the model itself
    (SliceGPT); tails: norm sites it followed by a linear map (`passes.slicegpt.add_tail`)."""

    masks: dict[str, Tensor]
    removed: dict[str, list[int]]
    shots: list[dict]
    plan: ShrinkPlan | None = None
    tails: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    """kinds: the `Structure.kind`s it supports; layers(model): the layers it prunes (unstructured / N:M);
    needs_data: reads calibration data; needs_lm: needs a causal LM's token windows; multishot: shots, update,
    fisher and lora_rank apply."""

    name: str
    kinds: frozenset[str]
    run: Callable[[nn.Module, Recipe, list[Group], Any, RunContext], Outcome]
    layers: Callable[[nn.Module], dict[str, nn.Module]]
    needs_data: bool = True
    needs_lm: bool = False
    multishot: bool = False


class MethodError(ValueError):
    """A method that cannot run on this model (found once the model is built); one line."""


# -- the multi-shot driver (LLM Surgeon and the baselines of its paper) ---------------------------------------
def surgeon_config(recipe: Recipe, curvature: str) -> SurgeonConfig:
    """The driver's config for `recipe` with the method's curvature ("kfac", "identity", "diag_a", "diag_ga")."""
    return SurgeonConfig(structure=recipe.structure, target=recipe.structure.kept(recipe.target), shots=recipe.shots,
                         curvature=curvature, update=recipe.update, damp_a=recipe.damp_a, damp_g=recipe.damp_g,
                         lora_rank=recipe.lora_rank, lora_steps=recipe.lora_steps,
                         nm_select=recipe.nm_select, seed=recipe.seed)


def collect_factors(model: nn.Module, windows: Any, *, recipe: Recipe, layers: list[str], ctx: RunContext):
    """One shot's KFAC factors in a `FactorStore` (packed lower triangles, off the compute device): in files
    under `recipe.offload_dir` when given, else in CPU memory.  `recipe.factor_memory` (GiB) bounds the
    accumulators alive at once; `recipe.offload_model` runs the passes with accelerate's offloading
    (`passes.offload`)."""
    store = FactorStore(recipe.offload_dir)
    budget = None if recipe.factor_memory is None else int(recipe.factor_memory * 2**30)
    with running(model, recipe, ctx.device):
        return collect_kfac(model, windows, layers=layers, fisher=recipe.fisher, fisher_approx=recipe.fisher_approx,
                            batch_size=recipe.batch_size, device=ctx.device, loss_fn=ctx.loss, progress=ctx.progress,
                            seed=recipe.seed, store=store, max_factor_bytes=budget)


def running(model: nn.Module, recipe: Recipe, device):
    """Context in which the model runs on `device`: accelerate offloading with `recipe.offload_model`."""
    return offloaded(model, device) if recipe.offload_model else nullcontext(model)


def _multishot(curvature: str, model: nn.Module, recipe: Recipe, groups: list[Group], calib: Any,
               ctx: RunContext) -> Outcome:
    groups_or_none = groups if recipe.structure.structured else None
    collect = ctx.collect_curvature or partial(collect_factors, recipe=recipe,
                                               layers=pruned_layers(model, groups_or_none), ctx=ctx)
    tell = ctx.lines or (lambda text: None)
    passes = itertools.count(1)

    def collect_and_tell(model: nn.Module, windows: Any) -> dict:
        start = time.perf_counter()
        factors = collect(model, windows)
        tell(f"curvature pass {next(passes)}: {len(windows)} windows, {time.perf_counter() - start:.1f} s")
        return factors

    def on_log(log) -> None:
        tell(f"shot {log.shot}/{recipe.shots}: kept {log.achieved:.3f} (target {log.target:.3f}), {log.seconds:.1f} s")
        if ctx.on_shot is not None:
            ctx.on_shot(log.shot, recipe.shots)

    result = prune(model, calib, groups_or_none, surgeon_config(recipe, curvature), collect_curvature=collect_and_tell,
                   checkpoint_dir=ctx.checkpoint_dir, progress=on_log, device=ctx.device)
    return Outcome(result.masks, result.removed, [asdict(log) for log in result.logs])


def _curved_layers(model: nn.Module) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {name: modules[name] for name in default_layers(model)}


# -- one pass over the blocks (SparseGPT, Wanda) --------------------------------------------------------------
def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the model's repeated blocks (the largest nn.ModuleList)."""
    try:
        prefix, blocks = find_blocks(model)
    except ValueError:
        raise MethodError("this method needs the model's blocks in an nn.ModuleList") from None
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in b.named_modules() if is_linear(m)}


def _sequential(fn: Callable, model: nn.Module, recipe: Recipe, groups: list[Group], calib: Any,
                ctx: RunContext) -> Outcome:
    nm = recipe.structure.nm
    amount = {"n_m": nm} if nm else {"sparsity": 1.0 - recipe.target}
    keep = fn(model, calib, batch_size=recipe.batch_size, progress=ctx.progress, **amount)
    modules = dict(model.named_modules())
    masks = {param_name(name): matrix_kind(modules[name]).storage(m, modules[name].weight.shape)
             for name, m in keep.items()}
    return Outcome(masks, {}, [])


# -- structured peers (FLAP, Wanda-sp): units removed, the pipeline's rewrite shrinks the model -----------------
def _structured_peer(fn: Callable, model: nn.Module, recipe: Recipe, groups: list[Group], calib: Any,
                     ctx: RunContext) -> Outcome:
    removed = fn(model, calib, groups, recipe.structure.kept(recipe.target), batch_size=recipe.batch_size,
                 progress=ctx.progress)
    return Outcome({}, removed, [])


# -- the residual stream rotated and sliced (SliceGPT) ---------------------------------------------------------
def _slice(model: nn.Module, recipe: Recipe, groups: list[Group], calib: Any, ctx: RunContext) -> Outcome:
    """Keep round(target × d) of the d residual directions; the model is rewritten here (Outcome.plan)."""
    if ctx.graph is None:
        raise MethodError("slicegpt needs the model's dependency graph")
    try:
        d = residual_group(ctx.graph).size
        width = max(1, round(recipe.target * d))
        result = slice_residual(model, ctx.graph, calib, width, batch_size=recipe.batch_size)
    except SliceError as err:
        raise MethodError(f"slicegpt: {err}") from None
    if ctx.lines is not None:
        ctx.lines(f"slicegpt: residual width {d} -> {width}")
    return Outcome({}, {}, [], result.plan or ShrinkPlan(), result.tails)


_ALL = frozenset({"structured", "unstructured", "nm"})
_SPARSE = frozenset({"unstructured", "nm"})


def _driver(curvature: str, needs_data: bool = True) -> dict:
    return dict(kinds=_ALL, run=partial(_multishot, curvature), layers=_curved_layers, needs_data=needs_data,
                multishot=True)


def _one_pass(fn: Callable) -> dict:
    return dict(kinds=_SPARSE, run=partial(_sequential, fn), layers=_block_linears, needs_lm=True)


def _peer(fn: Callable) -> dict:
    return dict(kinds=frozenset({"structured"}), run=partial(_structured_peer, fn), layers=_block_linears,
                needs_lm=True)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("surgeon", **_driver("kfac")),
    Method("magnitude", **_driver("identity", needs_data=False)),
    Method("l-obd", **_driver("diag_a")),
    Method("k-obd", **_driver("diag_ga")),
    Method("sparsegpt", **_one_pass(sparsegpt)),
    Method("wanda", **_one_pass(wanda)),
    Method("flap", **_peer(flap)),
    Method("wanda-sp", **_peer(wanda_sp)),
    Method("slicegpt", kinds=frozenset({"structured"}), run=_slice, layers=_curved_layers, needs_lm=True),
)}


def resolve(recipe: Recipe) -> Method:
    """The recipe's method, checked against its structure and options; RecipeError with one line else."""
    method = METHODS.get(recipe.method)
    if method is None:
        raise RecipeError(f"method must be one of {', '.join(METHODS)}, not {recipe.method!r}")
    if recipe.structure.kind not in method.kinds:
        kinds = ", ".join(sorted(k.replace("nm", "N:M") for k in method.kinds))
        raise RecipeError(f"method {method.name} does not support structure {recipe.structure} (it supports {kinds})")
    if recipe.lora_rank and not method.multishot:
        raise RecipeError(f"--lora-rank works with the multi-shot methods, not {method.name}")
    return method
