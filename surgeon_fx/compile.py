"""The compilation pipeline behind `surgeon-compile` and the Python API:

    build → trace → data → evaluate dense → prune → rewrite → evaluate pruned → verify + emit → report

`compile_model(model_file, recipe, out)` runs it and returns a `CompileResult`.  Every input that cannot work
(contract, target, structure, data, device, existing output) is rejected with a one-line `CompileError` (or
the error class of the module that found it, see `USER_ERRORS`) *before* anything is written.  Each stage is
timed and its own peak memory recorded (resident set size: VmHWM reset per stage on Linux, else the process's
`resource.getrusage` peak so far; plus CUDA peak allocation).

Structured pruning uses the dependency graph's exact groups (heads, KV heads, MLP neurons, conv channels);
the residual stream crosses normalisation layers (removal is not the same as zeroing) and stays whole.
The multi-shot methods checkpoint after every shot into ``<out>.work/`` next to the output; ``resume=True``
continues from there when every input that shaped the checkpoint (model file, dense weights, calibration data,
options) is the same (`run_inputs`), and refuses otherwise (`ResumeMismatch`).  The work folder is removed when
the output has been written.  The output is locked from start to end (`emit.output_lock`); weights and outputs
that are not finite are rejected, naming the first bad parameter.
"""
from __future__ import annotations

import ctypes
import json
import math
import resource
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from surgeon_fx.passes.blocks import to_matrix
from surgeon_fx.passes.rewrite import RewriteError, ShrinkPlan, shrink
from surgeon_fx.passes.round_units import ROUNDED_KINDS, with_multiple
from surgeon_fx.passes.surgeon import CheckpointMismatch
from surgeon_fx import distributed, emit, report
from surgeon_fx.cache import ResultCache, model_digest
from surgeon_fx.data import calibration_windows, digest, eval_windows, read_text, tokenize
from surgeon_fx.evaluate import main_output as outputs, perplexity
from surgeon_fx.graph import DependencyGraph, build_graph
from surgeon_fx.groups import Group, prunable_count, prunable_params, unit_sizes
from surgeon_fx.hf import drop_gguf_record
from surgeon_fx.loader import LoadError, load
from surgeon_fx.modelfile import ModelFile, ModelFileError, check_windows, sha256_of
from surgeon_fx.progress import Progress
from surgeon_fx.methods import Method, MethodError, Outcome, RunContext, resolve, running
from surgeon_fx.recipe import Recipe, RecipeError
from surgeon_fx.trace import TraceError, is_hf_model


class CompileError(ValueError):
    """An input the pipeline cannot work with; the message is one line naming the cause."""


class ResumeMismatch(CompileError):
    """``--resume`` found a checkpoint made from other inputs (model file, weights, calibration data, options)."""


USER_ERRORS = (CompileError, RecipeError, MethodError, ModelFileError, TraceError, emit.EmitError, LoadError)
RELOAD_TOLERANCE = 1e-4  # max |Δ| of reloaded vs in-memory outputs, relative to max(1, max |output|)


@dataclass
class StageLog:
    """Seconds spent in a stage and the peak memory seen by its end (MB)."""

    name: str
    seconds: float
    peak_rss_mb: float
    cuda_peak_mb: float | None


@dataclass
class CompileResult:
    """out: the written folder; model: the pruned model (eval mode); report: the report dict;
    plan: the ShrinkPlan (structured) or None (masks only); masks: param → keep-mask (masks only)."""

    out: Path
    model: nn.Module
    report: dict
    plan: ShrinkPlan | None
    masks: dict[str, Tensor]


def peak_rss_mb() -> float:
    """Peak resident set size in MB: since the last `reset_peak_rss` where Linux allows it (VmHWM), else of the
    process so far (ru_maxrss: KB on Linux, bytes on macOS)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def release_free_memory() -> None:
    """Hand the heap pages that earlier work freed back to the OS (glibc `malloc_trim(0)`): tensors below glibc's
    mmap threshold live on the heap, and without this a stage starts with every page a finished stage freed
    still resident (≈ 0.5 GB after SmolLM2's dense evaluation).  A no-op where the C library has no
    malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> None:
    """Start a new peak of `peak_rss_mb` (Linux: writing 5 to /proc/self/clear_refs resets VmHWM; elsewhere a
    no-op, and the peak stays the process's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Stages:
    """Times the pipeline's stages, records their peak memory and shows them (one bar, or a line per stage)."""

    def __init__(self, device: torch.device, total: int, progress: Progress):
        self.device, self.logs, self.progress = device, [], progress
        self.bar = tqdm(total=total, desc="surgeon-compile", unit="stage", disable=not progress.bars, leave=False)

    @contextmanager
    def __call__(self, name: str):
        self.bar.set_description(name)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        release_free_memory()
        reset_peak_rss()
        start = time.perf_counter()
        yield
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None
        self.logs.append(StageLog(name, time.perf_counter() - start, peak_rss_mb(), peak))
        self.bar.update(1)
        self.progress.line(f"{name}: {self.logs[-1].seconds:.1f} s")


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked to exist on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CompileError(f"device {name!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise CompileError(f"device {name!r} is not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise CompileError(f"device {name} is not available: this machine has no CUDA device")
    count, index = torch.cuda.device_count(), device.index or 0
    if index >= count:
        raise CompileError(f"device {name} is not available: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def max_diff(a: Tensor, b: Tensor) -> float:
    """max |a − b| relative to max(1, max |b|)."""
    return float((a.float() - b.float()).abs().max() / max(1.0, float(b.float().abs().max())))


# -- checks that need the model -----------------------------------------------------------------------------
def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def check_finite(model: nn.Module, what: str) -> None:
    """CompileError naming the first parameter or buffer of `model` that holds NaN or ±inf."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CompileError(f"{what} has non-finite weights: {name} holds "
                               f"{'NaN' if torch.isnan(t).any() else 'inf'} values")


def check_forward(model: nn.Module, inputs: tuple, mf: ModelFile) -> Tensor:
    """The model's output on the example inputs; a failure, a non-tensor or a non-finite output is an error
    of the model file (before any tracing or work)."""
    try:
        out = outputs(model, inputs)
    except Exception as err:  # noqa: BLE001 - the user's model on the user's inputs
        text = str(err).strip()
        raise ModelFileError(f"{mf.name}: the model fails on example_inputs() (wrong shape or number of inputs?): "
                             f"{type(err).__name__}: {text.splitlines()[0] if text else ''}") from None
    if not isinstance(out, Tensor):
        raise ModelFileError(f"{mf.name}: the model returns {type(out).__name__}; surgeon-compile needs a tensor, a "
                             f"tuple starting with one, or an output with .logits")
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise CompileError(f"{mf.name}: the model's output on example_inputs() is not finite (NaN or inf)")
    return out


def check_token_ids(ids: Tensor, model: nn.Module, what: str) -> None:
    """CompileError when token windows hold ids outside the model's input embedding (negative or ≥ vocab)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if not isinstance(emb, nn.Embedding) or ids.numel() == 0:
        return
    vocab, low, high = emb.num_embeddings, int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise CompileError(f"{what} holds token id {low if low < 0 else high}, outside the model's vocabulary "
                           f"(ids 0 to {vocab - 1}): does the tokenizer belong to this model?")


def prunable_groups(graph: DependencyGraph, round_to: int) -> list[Group]:
    """The exact groups of the graph; neuron and channel groups keep a multiple of `round_to` units
    (`passes.round_units.with_multiple`: heads are whole heads already); the graph's groups are not changed."""
    return with_multiple([g for g in graph.groups if g.exact], round_to)


def smallest_target(model: nn.Module, groups: list[Group]) -> float:
    """The smallest fraction of the groups' parameters structured pruning can keep (every group at its
    floor: `min_keep` units, rounded up to its `multiple`)."""
    total = prunable_count(model, groups)
    sizes = unit_sizes(model, groups)
    removable = sum(sum(sorted(sizes[g.name], reverse=True)[: max(0, g.size - g.floor)]) for g in groups)
    return max(0, total - removable) / max(1, total)


def check_model(model: nn.Module, mf: ModelFile, recipe: Recipe, method: Method,
                graph: DependencyGraph | None) -> list[Group]:
    """Everything about recipe × model that can fail; returns the groups (structured) or []."""
    if not mf.is_lm and method.needs_lm:
        raise CompileError(f"method {recipe.method} needs a causal language model; {mf.name} defines loss() "
                           f"(use surgeon, magnitude, l-obd or k-obd)")
    if not mf.is_lm and recipe.lora_rank:
        raise CompileError(f"--lora-rank trains on a language-model loss; {mf.name} defines its own loss()")
    limit = _max_positions(model)
    if limit is not None and method.needs_data and recipe.calib_length > limit:
        raise CompileError(f"calibration length {recipe.calib_length} exceeds the model's {limit} positions "
                           f"(use --calib-length {limit} or less)")
    if recipe.structure.structured:
        small = [g for g in graph.groups if g.exact and g.kind in ROUNDED_KINDS and g.size < 2 * recipe.round_to]
        if recipe.round_to > 1 and small:
            raise CompileError(f"--round-to {recipe.round_to} cannot apply to group {small[0].name} ({small[0].size} "
                               f"units, fewer than 2 x {recipe.round_to}); use --round-to "
                               f"{min(g.size for g in small) // 2} or less")
        groups = prunable_groups(graph, recipe.round_to)
        if not groups:
            raise CompileError(f"structured pruning is not possible: the dependency graph of {mf.name} has no "
                               f"prunable groups (every dimension is tied to an input, output or unknown op; "
                               f"try unstructured)")
        floor = smallest_target(model, groups)
        if recipe.target < floor:
            raise CompileError(f"target {recipe.target:g} cannot be met: structured pruning keeps at least "
                               f"{math.ceil(floor * 1000) / 1000:g} of the prunable parameters of this model "
                               f"(every group keeps min_keep units" + (", rounded to --round-to" if recipe.round_to
                                                                      > 1 else "") + ")")
        if floor >= 1.0:
            raise CompileError("structured pruning is not possible: no group can lose a unit")
        return groups
    try:
        layers = method.layers(model)
    except MethodError as err:
        raise CompileError(f"method {recipe.method}: {err}") from None
    if not layers:
        raise CompileError(f"{mf.name} has no layer to prune (nn.Linear, nn.Conv2d or HF Conv1D)")
    nm = recipe.structure.nm
    if nm:
        for name, m in layers.items():
            width = to_matrix(m, m.weight, None).shape[1]
            if width % nm[1]:
                raise CompileError(f"structure {recipe.structure} is not possible: layer {name} has {width} "
                                   f"inputs, not a multiple of {nm[1]}")
    return []


# -- data ---------------------------------------------------------------------------------------------------
def _text_ids(mf: ModelFile, source: str, option: str) -> Tensor:
    if not mf.is_lm:
        raise CompileError(f"{option} needs a language model; {mf.name} defines loss() and its own batches")
    tokenizer = mf.tokenizer()
    try:
        text = read_text(source)
    except (OSError, ValueError, ImportError) as err:
        raise CompileError(f"cannot read {option} {source}: {err}") from None
    if not text.strip():
        raise CompileError(f"{option} {source} is empty")
    try:
        return tokenize(tokenizer, text)
    except Exception as err:  # noqa: BLE001 - the model file's tokenizer
        raise ModelFileError(f"{mf.name}: tokenizer() failed on {option} {source}: {type(err).__name__}: "
                             f"{err}") from None


def calibration_data(mf: ModelFile, recipe: Recipe, method: Method) -> Any:
    """Calibration windows [n, length] (LM) or batches; None when the method needs none."""
    if not method.needs_data:
        return None
    if recipe.calib_file is None:
        return mf.calibration(recipe.calib_windows, recipe.calib_length, recipe.seed)
    ids = _text_ids(mf, recipe.calib_file, "--calib-file")
    if ids.numel() < recipe.calib_length:
        raise CompileError(f"calibration data too short: --calib-file {recipe.calib_file} has {ids.numel()} "
                           f"tokens, fewer than one window of {recipe.calib_length}")
    return calibration_windows(ids, recipe.calib_windows, recipe.calib_length, recipe.seed)


def evaluation_data(mf: ModelFile, recipe: Recipe, model: nn.Module) -> Any:
    """Evaluation windows [k, L] (LM) or batches, the first `eval_windows`; None without evaluation data."""
    if recipe.eval_file is not None:
        ids = _text_ids(mf, recipe.eval_file, "--eval-file")
        if ids.numel() < recipe.eval_length:
            raise CompileError(f"evaluation data too short: --eval-file {recipe.eval_file} has {ids.numel()} "
                               f"tokens, fewer than one window of {recipe.eval_length} (--eval-length)")
        data = eval_windows(ids, recipe.eval_length)
    else:
        data = mf.evaluation()
    if data is None:
        return None
    data = data[: recipe.eval_windows] if recipe.eval_windows else data
    limit = _max_positions(model)
    if mf.is_lm and limit is not None and data.shape[1] > limit:
        raise CompileError(f"evaluation windows of {data.shape[1]} tokens exceed the model's {limit} positions")
    return check_windows(data, "evaluation data") if mf.is_lm else data


def check_data(mf: ModelFile, model: nn.Module, calib: Any, data: Any, device: torch.device) -> None:
    """Token ids within the vocabulary (LM); for other models, `loss` gives a finite scalar on the first
    calibration batch (so wrong batches fail here, before any work, with the model file named)."""
    if mf.is_lm:
        for ids, what in ((calib, "the calibration data"), (data, "the evaluation data")):
            if ids is not None:
                check_token_ids(ids, model, what)
        return
    if calib is not None:
        with torch.no_grad():
            value = mf.checked_loss(model, _to(calib[0], device))
        if not torch.isfinite(value):
            raise CompileError(f"{mf.name}: loss() on the first calibration batch is not finite ({float(value)})")


def evaluate(model: nn.Module, mf: ModelFile, data: Any, recipe: Recipe, device, progress: bool) -> dict | None:
    """Perplexity (LM) or mean loss per example (other models) on the evaluation data."""
    if data is None:
        return None
    if mf.is_lm:
        r = perplexity(model, data, batch_size=recipe.batch_size, device=device, progress=progress)
        return {"metric": "perplexity", "value": r.ppl, "windows": r.windows, "length": int(data.shape[1])}
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(data, desc="evaluate", disable=not progress, leave=False):
            total += float(mf.checked_loss(model, _to(batch, device)))
            count += len(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return {"metric": "loss per example", "value": total / count, "windows": len(data), "length": None}


def dense_evaluation(model: nn.Module, mf: ModelFile, data: Any, recipe: Recipe, device, progress: Progress,
                     cache: ResultCache | None) -> dict | None:
    """`evaluate` of the dense model, kept in `cache` under the digests of the model's weights, the evaluation
    windows and the settings (batch size, device type), so a rerun on the same model and data skips it.
    Only token windows (a tensor) are cached; other models' batches are evaluated every time."""
    if cache is None or not isinstance(data, Tensor):
        return evaluate(model, mf, data, recipe, device, progress.bars)
    key = digest({"model": model_digest(model), "windows": data, "batch_size": recipe.batch_size,
                  "device": device.type})
    found = cache.get("dense-eval", key)
    if found is not None:
        progress.line(f"evaluate dense: from the cache ({cache.path('dense-eval', key)})")
        return found
    result = evaluate(model, mf, data, recipe, device, progress.bars)
    cache.put("dense-eval", key, result)
    return result


# -- pruning ------------------------------------------------------------------------------------------------
def work_dir(out: Path) -> Path:
    """Where checkpoints of an unfinished run live: ``<out>.work`` beside the output folder."""
    return out.parent / f"{out.name}.work"


INPUTS = "inputs.json"  # in the work folder: what shaped its checkpoint
NOT_SHAPING = ("eval_windows", "eval_file", "eval_length", "device")  # recipe fields a checkpoint does not depend on


def run_inputs(mf: ModelFile, recipe: Recipe, model: nn.Module, calib: Any) -> dict:
    """Every input that shapes a checkpoint: the model file's sha256 (a Hugging Face folder: its config.json),
    a digest of the dense weights, a digest of the calibration data, and the recipe's options."""
    source = mf.path if mf.path is not None else mf.hf_path / "config.json"
    return {"model file": sha256_of(source), "weights": model_digest(model),
            "calibration data": digest(calib),
            "options": {k: v for k, v in recipe.to_dict().items() if k not in NOT_SHAPING}}


def start_work(work: Path, inputs: dict, resume: bool) -> None:
    """Create the work folder with its inputs record; with `resume`, keep an existing one only when its record
    equals `inputs` (else `ResumeMismatch`, naming what differs, and the folder is left as it is)."""
    if resume and work.exists():
        try:
            saved = json.loads((work / INPUTS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if saved != inputs:
            raise ResumeMismatch(f"--resume: the checkpoint in {work} was made from {_difference(saved, inputs)}; "
                                 f"run without --resume to start again")
        return
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / INPUTS).write_text(json.dumps(inputs, indent=1) + "\n", encoding="utf-8")


def _difference(saved: dict | None, now: dict) -> str:
    if not isinstance(saved, dict) or saved.keys() != now.keys():
        return "unrecorded inputs"
    if saved["options"] != now["options"]:
        key = next(k for k in now["options"] if saved["options"].get(k) != now["options"][k])
        return f"other options ({key} was {saved['options'].get(key)!r}, now {now['options'][key]!r})"
    return next(phrase for k, phrase in CHANGED.items() if saved[k] != now[k])


CHANGED = {"model file": "another model file (its sha256 differs)", "weights": "other model weights",
           "calibration data": "other calibration data (windows, length, text file or seed)"}


def run_pruning(model: nn.Module, recipe: Recipe, groups: list[Group], calib: Any, ctx: RunContext) -> Outcome:
    """Run the recipe's method in place (`surgeon_fx.methods`), with a progress bar over the shots."""
    method = resolve(recipe)
    bar = tqdm(total=recipe.shots, desc="shots", unit="shot", disable=not (ctx.progress and method.multishot),
               leave=False)
    try:
        return method.run(model, recipe, groups, calib, replace(ctx, on_shot=lambda done, total: bar.update(1)))
    except CheckpointMismatch:
        raise ResumeMismatch(f"--resume: the checkpoint in {ctx.checkpoint_dir} was written with other options; run "
                           f"without --resume to start again") from None
    finally:
        bar.close()


# -- the driver ---------------------------------------------------------------------------------------------
def compile_model(mf: ModelFile, recipe: Recipe, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                  progress: bool | str | Progress | None = None, cache: ResultCache | None = None) -> CompileResult:
    """Compile the model of `mf` with `recipe` into folder `out` (see the module docstring).

    progress: None shows bars on a terminal and lines otherwise, True bars, False nothing, or a mode of
    `surgeon_fx.progress` ("bars", "lines", "off"); cache: where the dense evaluation is kept between runs
    (None: not cached)."""
    recipe.check()
    method = resolve(recipe)
    out = Path(out).absolute()
    emit.check_target(out, overwrite)
    device = resolve_device(recipe.device)
    home = torch.device("cpu") if recipe.offload_model else device  # where the weights live
    main, several = distributed.rank() == 0, distributed.world_size() > 1
    if several and resume:
        raise CompileError("--resume does not work with several processes (no checkpoints are written then)")
    progress = Progress.of(progress if main else False)
    restore_bars = progress.silence_libraries()
    structured = recipe.structure.structured
    stages = Stages(device, 9 if structured else 8, progress)
    with emit.output_lock(out, overwrite) if main else nullcontext():  # rank 0 alone writes
        try:
            with stages("build"):
                model = mf.build().to(home).eval()
                inputs = tuple(_to(x, home) for x in mf.example_inputs(model))
                hf = is_hf_model(model)
                if hf:
                    drop_gguf_record(model)
                check_finite(model, mf.name)
                check_forward(model, inputs, mf)
                source = _source(mf, model, hf)
                dense = report.weight_counts(model)
                dense_sizes = {n: p.numel() for n, p in model.named_parameters()}
            graph = None
            if structured:
                with stages("trace"):
                    graph = build_graph(model, inputs)
            groups = check_model(model, mf, recipe, method, graph)
            with stages("data"):
                calib = calibration_data(mf, recipe, method)
                data = evaluation_data(mf, recipe, model)
                check_data(mf, model, calib, data, home)
            with stages("evaluate dense"), running(model, recipe, device):
                before = dense_evaluation(model, mf, data, recipe, device, progress, cache) if main else None
            with stages("prune"):
                outcome = _prune(mf, recipe, method, model, groups, calib, out, resume, device, progress, graph)
                masks, removed, shots = outcome.masks, outcome.removed, outcome.shots
                check_finite(model, "the pruned model")
            if not main:  # every rank pruned the same way; rank 0 alone evaluates and writes
                return CompileResult(out, model, {}, None, {} if structured else masks)
            with stages("rewrite"):
                if outcome.plan is not None:  # the method rewrote the model itself (SliceGPT)
                    plan, checks = outcome.plan, {}
                else:
                    plan, checks = _rewrite(model, graph, removed, inputs) if structured else (None, {})
            with stages("evaluate pruned"), running(model, recipe, device):
                after = evaluate(model, mf, data, recipe, device, progress.bars)
            tokenizer = _tokenizer_for_hf(mf) if hf else None
            pruned = outputs(model, inputs)
            if not torch.isfinite(pruned).all():
                raise CompileError("the pruned model's output on example_inputs() is not finite (NaN or inf)")
            with emit.atomic_dir(out, overwrite) as tmp:
                with stages("emit + verify"):
                    manifest = {**_manifest(mf, source, recipe, plan, masks, model), "tails": outcome.tails}
                    files = [f.relative_to(tmp) for f in _emit(tmp, model, manifest, tokenizer, inputs, hf, mf)]
                    reloaded = load(tmp, home, trust_source=True)  # our own folder and the user's own file
                    checks["reload_max_abs"] = max_diff(outputs(reloaded, inputs), pruned)
                    if not checks["reload_max_abs"] <= RELOAD_TOLERANCE:  # NaN included
                        raise CompileError(f"the written model does not reproduce the pruned one (max |Δ| = "
                                           f"{checks['reload_max_abs']:.3g}); nothing written")
                data_report = _report(mf, recipe, model, dense, dense_sizes, groups, removed, masks, shots, before,
                                      after, checks, files, out, stages.logs)
                report.write_report(tmp, data_report, {f"{recipe.method} {_label(recipe)}": _rows(dense, model,
                                                                                                 masks)})
        finally:
            stages.bar.close()
            restore_bars()
        shutil.rmtree(work_dir(out), ignore_errors=True)
    return CompileResult(out, model, data_report, plan, {} if structured else masks)


def _prune(mf: ModelFile, recipe: Recipe, method: Method, model: nn.Module, groups: list[Group], calib: Any,
           out: Path, resume: bool, device: torch.device, progress: Progress,
           graph: DependencyGraph | None) -> Outcome:
    """`run_pruning`; the multi-shot methods checkpoint in the work folder (`start_work`), which is removed again
    when the run fails before its first checkpoint (nothing to resume)."""
    ctx = RunContext(device=device, loss=None if mf.is_lm else mf.checked_loss, progress=progress.bars,
                     lines=progress.line, graph=graph)
    if not method.multishot or distributed.world_size() > 1:  # one pass, or several processes: no checkpoints
        return run_pruning(model, recipe, groups, calib, ctx)
    work = work_dir(out)
    start_work(work, run_inputs(mf, recipe, model, calib), resume)
    try:
        return run_pruning(model, recipe, groups, calib, replace(ctx, checkpoint_dir=work / "checkpoint"))
    except BaseException:
        if not (work / "checkpoint").exists():
            shutil.rmtree(work, ignore_errors=True)
        raise


def _tokenizer_for_hf(mf: ModelFile):
    """The model file's tokenizer to save into hf/, None when it has none (hf/ is then weights + config)."""
    try:
        return mf.tokenizer() if mf.tokenizer_fn is not None else None
    except ModelFileError:
        return None


def _label(recipe: Recipe) -> str:
    return str(recipe.structure) if recipe.structure.nm else f"{recipe.structure} {recipe.target:g}"


def _rows(dense: dict, model: nn.Module, masks: dict[str, Tensor]) -> list[report.LayerRow]:
    return report.layer_rows(dense, report.weight_counts(model, masks))


def _rewrite(model: nn.Module, graph: DependencyGraph, removed: dict[str, list[int]], inputs: tuple):
    """Shrink the (masked) model in place; check that its outputs did not change."""
    masked = outputs(model, inputs)
    try:
        plan = shrink(model, graph, removed)
    except RewriteError as err:
        raise CompileError(f"rewrite failed: {err}") from None
    return plan, {"pruned_vs_masked_max_abs": max_diff(outputs(model, inputs), masked)}


def _source(mf: ModelFile, model: nn.Module, hf: bool) -> dict:
    """How to rebuild the original module tree (recorded before pruning changes the config)."""
    source: dict = {"name": mf.name}
    if mf.path is not None:
        source.update(path=str(mf.path), sha256=mf.sha256, copy=f"source/{mf.path.name}")
    if mf.hf_path is not None:
        source["hf_path"] = str(mf.hf_path)
    if hf:
        source.update(hf_config=model.config.to_dict(), model_class=type(model).__name__,
                      attn_implementation=model.config._attn_implementation,
                      experts_implementation=getattr(model.config, "_experts_implementation", None),
                      dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    return source


def _manifest(mf: ModelFile, source: dict, recipe: Recipe, plan: ShrinkPlan | None, masks: dict[str, Tensor],
              model: nn.Module) -> dict:
    params = dict(model.named_parameters())
    return {"source": source, "method": recipe.method, "structure": str(recipe.structure),
            "target": None if recipe.structure.nm else recipe.target, "plan": plan.to_json() if plan else None,
            "masks_only": plan is None,
            "dense_shapes": {n: list(params[n].shape) for n in masks} if plan is None else None,
            "weights": emit.WEIGHTS}


def _emit(tmp: Path, model: nn.Module, manifest: dict, tokenizer, inputs: tuple, hf: bool, mf: ModelFile) -> list:
    files = [emit.save_weights(model, tmp)]
    if mf.path is not None:
        (tmp / "source").mkdir()
        files.append(Path(shutil.copy2(mf.path, tmp / manifest["source"]["copy"])))
    reason = "not a Hugging Face model" if not hf else emit.save_hf(model, tokenizer, tmp / emit.HF_DIR, inputs,
                                                                    manifest["source"]["hf_config"])
    manifest.update(hf=None if reason else emit.HF_DIR, hf_note=reason)
    if reason is None:
        files.append(tmp / emit.HF_DIR)
    files.append(emit.write_manifest(tmp, manifest))
    return files


def _report(mf, recipe, model, dense, dense_sizes, groups, removed, masks, shots, before, after, checks, files, out,
            stages) -> dict:
    rows = _rows(dense, model, masks)
    params = dict(model.named_parameters())
    zeroed = 0 if groups else sum(int((~m).sum()) for m in masks.values())
    if groups:
        names = prunable_params(model, groups)
        pr_after = sum(params[p].numel() for p in names)
        pr_before, note = sum(dense_sizes[p] for p in names), None
    else:
        pr_before = sum(m.numel() for m in masks.values())
        pr_after, note = pr_before - zeroed, "Pruned weights are zeros in dense tensors (masks only)."
    n_after = sum(p.numel() for p in model.parameters()) - zeroed
    evaluation = None
    if before is not None:
        evaluation = {"metric": before["metric"], "before": before["value"], "after": after["value"],
                      "windows": before["windows"], "length": before["length"]}
    output = [str(out / f) for f in files] + [str(out / name) for name in report.REPORT_FILES]
    return {"source": {"name": mf.name, "path": str(mf.path) if mf.path else None,
                       "hf_path": str(mf.hf_path) if mf.hf_path else None,
                       "hf_class": type(model).__name__ if is_hf_model(model) else None},
            "recipe": recipe.to_dict(), "nm": recipe.structure.nm is not None,
            "parameters": {"before": sum(dense_sizes.values()), "after": n_after, "prunable_before": pr_before,
                           "prunable_after": pr_after, "note": note},
            "groups": [{"name": g.name, "kind": g.kind, "units": g.size, "kept": g.size - len(removed.get(g.name, []))}
                       for g in groups],
            "layers": report.rows_as_dicts(rows), "kept_by_depth": report.kept_by_depth(rows),
            "kept_by_kind": report.kept_by_kind(rows), "evaluation": evaluation, "shots": shots, "checks": checks,
            "stages": [asdict(s) for s in stages], "output": output, "environment": report.environment()}
