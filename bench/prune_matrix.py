"""Method × structure × target matrix on SmolLM2-135M: perplexity, parameters, time and peak memory.

    python bench/prune_matrix.py                       # the default matrix (resumes finished runs)
    python bench/prune_matrix.py --only surgeon/structured/0.8 surgeon/2:4/0.5 --shots 3
    python bench/prune_matrix.py --table               # rebuild the table and plots from finished runs

Calibration: `--calib-windows` random windows of `--calib-length` tokens from wikitext-2 valid.txt (seed 0).
Evaluation: the first `--eval-windows` non-overlapping 2048-token windows of wikitext-2-raw wiki.test.raw (the
whole file tokenized once), or all 147 with `--eval-windows 0`; with `--split valid` instead the 2048-token
windows of valid.txt that share no token with the calibration windows (`data.validation_windows`), the text
on which settings are chosen (runs in `<out>_valid/`).
`--lora-rank` adds LLM Surgeon's low-rank corrections after each shot; the one-shot peers (SparseGPT, Wanda, FLAP,
Wanda-sp; not SliceGPT) get the same corrections after their pruning (`peer_corrections`), with as many steps as
all shots together, so their "+ LoRA" rows are the like-for-like control.  `--damp-a` sets the relative damping
of A for the KFAC methods.
`--eval-bf16` scores under bfloat16 autocast (1.7x faster on this CPU, docs/results/eval_precision.md) and
checks each run's first 4 windows in float32 (`bf16_rel_error` in its JSON, † in the table).
FLAP and Wanda-sp (`passes/flap.py`, `passes/wanda_sp.py`) prune the same exact groups as the structured LLM
Surgeon rows and go through the same rewrite; `flap-kind` is FLAP with scores standardised per layer type.
Every run starts from the same dense model in one process; the dense model's curvature for the first shot is
computed once and shared by the runs that use KFAC statistics (identical data and model, so identical factors); later shots re-estimate on the pruned model.
Each run is written to `<out>/runs/<id>.json` as it finishes, so an interrupted matrix resumes.
The dense model's score is copied from an earlier run folder that scored the same windows in the same precision
(`measured_dense`) instead of measured again.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import pickle
import platform
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon_fx.passes.curvature import KronFactors, collect_kfac  # noqa: E402
from surgeon_fx.passes.lora import lora_correct  # noqa: E402
from surgeon_fx.passes.surgeon import SurgeonConfig, pruned_layers  # noqa: E402
from surgeon_fx.data import calibration_windows, eval_windows, read_text, tokenize, validation_windows  # noqa: E402
from surgeon_fx.evaluate import perplexity  # noqa: E402
from surgeon_fx.graph import build_graph  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402
from surgeon_fx.passes.rewrite import shrink  # noqa: E402
from surgeon_fx.passes.flap import flap  # noqa: E402
from surgeon_fx.passes.slicegpt import slice_residual  # noqa: E402
from surgeon_fx.passes.wanda_sp import wanda_sp  # noqa: E402
from surgeon_fx.compile import prunable_groups, run_pruning  # noqa: E402
from surgeon_fx.methods import RunContext  # noqa: E402
from surgeon_fx.recipe import Recipe  # noqa: E402
from surgeon_fx.report import LayerRow, layer_depth, layer_role, plot_kept  # noqa: E402

DATA = ROOT / "../shared/data"
RESULTS = ROOT / "docs/results"
CACHE = RESULTS / "prune_matrix_cache"  # dense KFAC factors per calibration size (not committed)
CHECK_WINDOWS = 4  # windows scored in both float32 and bf16 by an --eval-bf16 run
BASELINES = ("surgeon", "magnitude", "k-obd", "l-obd")
# in the order they run: a partial matrix is still a useful table (the slow LLM Surgeon sparse runs come last)
SPARSE_PEERS = ("sparsegpt", "wanda")  # one-shot unstructured / N:M peers
STRUCTURED_PEERS = {"flap": flap, "flap-kind": partial(flap, standardise="kind"), "wanda-sp": wanda_sp}
CORRECTED_PEERS = SPARSE_PEERS + tuple(STRUCTURED_PEERS)  # get LLM Surgeon's LoRA corrections (--lora-rank)
MATRIX = ([(m, "structured", t) for t in (0.9, 0.8, 0.7) for m in BASELINES + ("slicegpt", "flap", "wanda-sp")]
          + [(m, s, 0.5) for s in ("2:4", "unstructured") for m in ("sparsegpt", "wanda") + BASELINES[1:]]
          + [("surgeon", s, 0.5) for s in ("2:4", "unstructured")])


class PeakRSS:
    """Samples this process's resident set size every 50 ms; `.peak` in MiB since start."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page / 2**20)
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# the code this process runs: HEAD when it started (a checkout may move on while a long matrix runs)
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip() or "unknown"


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": COMMIT,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": os.getloadavg()}


def run_id(method: str, structure: str, target: float) -> str:
    return f"{method}_{structure.replace(':', 'of')}_{target:g}"


def layer_kept(dense: torch.nn.Module, pruned: torch.nn.Module) -> dict[str, float]:
    """Kept fraction of each linear weight: non-zeros of the pruned weight / elements of the dense one."""
    out = {}
    pruned_mods = dict(pruned.named_modules())
    for name, mod in dense.named_modules():
        if isinstance(mod, torch.nn.Linear) and name in pruned_mods and name != "lm_head":
            out[name] = float((pruned_mods[name].weight != 0).sum()) / mod.weight.numel()
    return out


def shared_first_shot(factors: dict):
    """A curvature callable that returns `factors` on its first call (the dense model), then recomputes."""
    calls = {"n": 0}

    def collect(model, windows, layers):
        calls["n"] += 1
        if calls["n"] == 1:
            return {k: factors[k] for k in layers if k in factors}
        return collect_kfac(model, windows, layers=layers)

    return collect


def dense_factors(model, calib, graph, cache: Path) -> dict:
    """KFAC factors of the dense model for every layer any run prunes, cached on disk (not committed).

    The cache holds plain tensors and numbers only ({layer: {"A", "G", "tokens"}}) and is read with
    `weights_only=True`, so a cache file from elsewhere cannot run code; an older cache of pickled objects is
    not loaded but recomputed."""
    if cache.exists():
        try:
            return {name: KronFactors(**f) for name, f in torch.load(cache, weights_only=True).items()}
        except pickle.UnpicklingError:
            print(f"{cache}: not plain tensors (an older cache?); recomputing", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    layers = sorted(set(pruned_layers(model, None)) | set(pruned_layers(model, prunable_groups(graph, 1))))
    factors = collect_kfac(model, calib, layers=layers)
    seconds = time.perf_counter() - start
    print(f"dense curvature: {seconds:.0f} s", flush=True)
    torch.save({name: {"A": f.A, "G": f.G, "tokens": f.tokens} for name, f in factors.items()}, cache)
    cache.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "layers": len(layers),
                                                      "windows": list(calib.shape), "machine": machine()}))
    return factors


def parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-length", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4, help="first k test windows; 0 = all 147")
    ap.add_argument("--split", choices=("test", "valid"), default="test",
                    help="evaluate on the test file or on validation windows of valid.txt (disjoint from "
                         "the calibration windows)")
    ap.add_argument("--eval-batch", type=int, default=1, help="windows per forward pass in evaluation")
    ap.add_argument("--eval-bf16", action="store_true",
                    help="evaluate under bfloat16 autocast (~1.7x faster on this CPU); every run also scores its "
                         f"first {CHECK_WINDOWS} windows in float32 and records the relative error")
    ap.add_argument("--shots", type=int, default=1, help="shots for structured runs")
    ap.add_argument("--sparse-shots", type=int, default=1, help="shots for unstructured and N:M runs")
    ap.add_argument("--lora-rank", type=int, default=0, help="low-rank corrections after each shot of the "
                                                             "multi-shot methods (surgeon, k-obd, l-obd, magnitude) "
                                                             "and after the pruning of the one-shot peers")
    ap.add_argument("--lora-steps", type=int, default=20, help="Adam steps of those corrections per shot")
    ap.add_argument("--damp-a", type=float, default=SurgeonConfig.damp_a,
                    help="relative damping of A (x its mean diagonal) for surgeon, k-obd and l-obd")
    ap.add_argument("--nm-select", choices=("sequential", "fixed"), default="sequential",
                    help="LLM Surgeon N:M choice during the update's sweep or before it")
    ap.add_argument("--only", nargs="*", help="runs as method/structure/target, e.g. surgeon/2:4/0.5")
    ap.add_argument("--out", type=Path, help="run folder (default docs/results/prune_matrix_<W>x<L>); the table "
                                             "is <out>.md, the plots <out>_<structure>/")
    ap.add_argument("--table", action="store_true", help="only rebuild the table from finished runs")
    ap.add_argument("--reverse", action="store_true", help="take the runs from the end (a second worker)")
    return ap


def main() -> None:
    args = parser().parse_args()
    args.out = args.out or RESULTS / (f"prune_matrix_{args.calib_windows}x{args.calib_length}"
                                      + ("_valid" if args.split == "valid" else ""))
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if args.table:
        if not (args.out / "layer_sizes.json").exists():
            save_layer_sizes(load_smollm2()[0], args.out)
        write_table(args.out)
        return
    todo = [tuple(r.split("/")[:2]) + (float(r.split("/")[2]),) for r in args.only] if args.only else \
        MATRIX
    todo = [r for r in (todo[::-1] if args.reverse else todo) if not (runs_dir / f"{run_id(*r)}.json").exists()]
    if not todo:
        write_table(args.out)
        return

    model, tokenizer = load_smollm2()
    save_layer_sizes(model, args.out)
    valid_ids = tokenize(tokenizer, read_text(DATA / "wikitext-2/valid.txt"))
    calib = calibration_windows(valid_ids, args.calib_windows, args.calib_length, seed=0)
    if args.split == "valid":
        evals = validation_windows(valid_ids, 2048, args.calib_windows, args.calib_length, seed=0,
                                   limit=args.eval_windows or None)
        where = "wikitext-2 valid.txt windows disjoint from the calibration windows"
    else:
        evals = eval_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2-raw/wiki.test.raw")), 2048,
                             limit=args.eval_windows or None)
        where = "wikitext-2-raw wiki.test.raw"
    setup = {"calibration": f"{args.calib_windows} x {args.calib_length} tokens, wikitext-2 valid.txt, seed 0",
             "evaluation": f"first {len(evals)} x 2048-token windows of {where}",
             "shots": {"structured": args.shots, "sparse": args.sparse_shots},
             "lora": {"rank": args.lora_rank, "steps": args.lora_steps} if args.lora_rank else None,
             "nm_select": args.nm_select, "damp_a": args.damp_a,
             "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)"}
    dense_file = args.out / f"dense_{len(evals)}.json"
    earlier = measured_dense(setup, args.eval_bf16, [RESULTS, args.out.parent])
    if not dense_file.exists() and earlier is not None:  # the same windows scored the same way: no re-evaluation
        dense_file.write_text(json.dumps({**json.loads(earlier.read_text()), **setup,
                                          "copied_from": os.path.relpath(earlier.resolve(), ROOT)}, indent=1))
    elif not dense_file.exists():
        start = time.perf_counter()
        scores = evaluate(model, evals, args.eval_batch, args.eval_bf16)
        dense_file.write_text(json.dumps({**scores, "eval_s": time.perf_counter() - start, **setup,
                                          "machine": machine()}, indent=1))
    graph = build_graph(model, (calib[:1, :64],))
    factors = None
    for method, structure, target in todo:
        claim = runs_dir / f"{run_id(method, structure, target)}.running"
        if (runs_dir / f"{run_id(method, structure, target)}.json").exists() or claim.exists():
            continue  # finished or taken by another worker
        claim.touch()
        shots = args.shots if structure == "structured" else args.sparse_shots
        # SliceGPT is a Python-API pass (its tied-head tail is not a recipe output)
        python_api = method == "slicegpt" or method in STRUCTURED_PEERS  # passes called directly
        # one-shot peers take no LoRA recipe: with --lora-rank the same corrections follow their pruning
        peer_lora = args.lora_rank if method in CORRECTED_PEERS else 0
        recipe = None if python_api else Recipe(structure=structure, target=target, method=method, shots=shots,
                                                lora_rank=args.lora_rank - peer_lora, lora_steps=args.lora_steps,
                                                nm_select=args.nm_select, damp_a=args.damp_a)
        if recipe is not None:
            recipe.check()
        groups = prunable_groups(graph, 1) if structure == "structured" else None
        needs_kfac = method in ("surgeon", "k-obd", "l-obd")
        if needs_kfac and factors is None:
            factors = dense_factors(model, calib, graph, CACHE / f"dense_factors_{len(calib)}x{calib.shape[1]}.pt")
        pruned = copy.deepcopy(model)
        n0 = sum(p.numel() for p in pruned.parameters())
        collect = None
        if needs_kfac:
            share = shared_first_shot(factors)
            layers = pruned_layers(pruned, groups)
            collect = lambda m, w, _l=layers, _s=share: _s(m, w, _l)  # noqa: E731
        with PeakRSS() as rss:
            start = time.perf_counter()
            if method in STRUCTURED_PEERS:
                removed = STRUCTURED_PEERS[method](pruned, calib, groups, target)
                plan, logs = shrink(pruned, graph, {g: u for g, u in removed.items() if u}), []
            elif recipe is None:
                width = round(target * pruned.config.hidden_size)
                sliced = slice_residual(pruned, graph, calib, width)
                plan, logs = None, [{"width": width, "kept_energy": sliced.kept_energy}]
            else:
                outcome = run_pruning(pruned, recipe, groups, calib, RunContext(collect_curvature=collect))
                removed, logs = outcome.removed, outcome.shots
                plan = shrink(pruned, graph, {g: u for g, u in removed.items() if u}) if groups else None
            if peer_lora:  # after the peer's pruning (and, structured, its shrink): the same corrections, as
                # many steps as LLM Surgeon trains over all its shots
                logs = logs + [{"lora_loss": peer_corrections(pruned, calib, peer_lora, shots * args.lora_steps)}]
            seconds = time.perf_counter() - start
        start = time.perf_counter()
        scores = evaluate(pruned, evals, args.eval_batch, args.eval_bf16)
        ppl, eval_s = scores["ppl"], time.perf_counter() - start
        n1 = sum(p.numel() for p in pruned.parameters())
        kept = layer_kept(model, pruned)
        record = {"method": method, "structure": structure, "target": target, **scores,
                  "params_before": n0, "params_after": n1,
                  "linear_kept": sum(kept[k] * dict(model.named_modules())[k].weight.numel() for k in kept)
                  / sum(dict(model.named_modules())[k].weight.numel() for k in kept),
                  "prune_s": seconds, "eval_s": eval_s, "peak_rss_mib": rss.peak, "layer_kept": kept,
                  "shot_logs": logs, "config": plan.config if plan else {}, "zero_shot": {}, **setup,
                  "machine": machine()}
        (runs_dir / f"{run_id(method, structure, target)}.json").write_text(json.dumps(record, indent=1))
        claim.unlink()
        print(f"{method:10s} {structure:12s} {target:.2f}  ppl {ppl:9.2f}  params {n1 / n0:.3f}  "
              f"{seconds:6.0f} s  {rss.peak:6.0f} MiB", flush=True)
        del pruned
    write_table(args.out)


def peer_corrections(model, calib: torch.Tensor, rank: int, steps: int) -> list[float]:
    """LLM Surgeon's low-rank corrections after a one-shot peer (`CORRECTED_PEERS`): rank-`rank` adapters on the
    layers LLM Surgeon corrects, masked to the weights the peer kept (w ≠ 0; a structured peer's layers, already
    shrunk, keep all), `steps` Adam steps at LLM Surgeon's learning rate and first-shot seed, so a "+ LoRA" row
    of a peer is trained as LLM Surgeon's.
    Returns the loss at each step."""
    layers = pruned_layers(model, None)
    modules = dict(model.named_modules())
    masks = {f"{name}.weight": modules[name].weight != 0 for name in layers}
    config = SurgeonConfig()
    return lora_correct(model, calib, layers, masks, rank, steps, config.lora_lr, seed=config.seed)


def evaluate(model, evals: torch.Tensor, batch: int, bf16: bool) -> dict:
    """Perplexity over `evals` [k, 2048], in float32, or under bfloat16 autocast with a float32 check.

    With bf16 the first CHECK_WINDOWS windows are scored both ways: `bf16_rel_error` = PPL_bf16 / PPL_fp32 − 1
    on them, the evidence that this run's bf16 figure is within the 0.1% the tables allow.  The full-split
    NLL is the token-weighted mean of the bf16 NLLs of the checked and the remaining windows.
    """
    if not bf16:
        return {"ppl": perplexity(model, evals, batch_size=batch).ppl, "eval_dtype": "float32"}
    head = perplexity(model, evals[:CHECK_WINDOWS], batch_size=batch)
    head_bf16 = perplexity(model, evals[:CHECK_WINDOWS], batch_size=batch, autocast=torch.bfloat16)
    parts = [head_bf16]
    if len(evals) > CHECK_WINDOWS:
        parts.append(perplexity(model, evals[CHECK_WINDOWS:], batch_size=batch, autocast=torch.bfloat16))
    nll = sum(r.nll * r.tokens for r in parts) / sum(r.tokens for r in parts)
    return {"ppl": math.exp(nll), "eval_dtype": "bfloat16 autocast",
            "bf16_check": {"windows": CHECK_WINDOWS, "ppl_float32": head.ppl, "ppl_bf16": head_bf16.ppl},
            "bf16_rel_error": head_bf16.ppl / head.ppl - 1}


def measured_dense(setup: dict, bf16: bool, folders: list[Path]) -> Path | None:
    """A dense record (`<folder>/<run folder>/dense_<k>.json`, measured, not itself copied) of the same model on the
    same evaluation windows in the same precision as `setup`'s, or None.  Test windows depend only on their count;
    validation windows also on the calibration windows they avoid, so those must match too."""
    dtype = "bfloat16 autocast" if bf16 else "float32"
    keys = ("model", "evaluation") + (("calibration",) if "valid.txt" in setup["evaluation"] else ())
    for path in sorted({p.resolve() for folder in folders for p in folder.glob("*/dense_*.json")}):
        record = json.loads(path.read_text())
        if ("copied_from" not in record and record.get("eval_dtype", "float32") == dtype
                and all(record.get(k) == setup[k] for k in keys)):
            return path
    return None


def save_layer_sizes(model, out: Path) -> None:
    """Weights per linear layer of the dense model: the weights of the per-depth and per-kind plots."""
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    (out / "layer_sizes.json").write_text(json.dumps(sizes))


def evaluated_windows(evaluation: str) -> int:
    """How many windows a run's recorded `evaluation` ("first N x 2048-token windows of ...") scored."""
    return int(evaluation.split(" x ")[0].removeprefix("first "))


def command_line(out: Path, runs: list[dict]) -> str:
    """The command that measures the table's runs again, derived from the setup each run records; options at
    the parser's defaults are left out (a setup recorded before an option existed had its default)."""
    setup, default = runs[0], parser().get_default
    windows, length = (int(x) for x in setup["calibration"].split(" tokens")[0].split(" x "))
    recorded = {"calib-windows": windows, "calib-length": length, "shots": setup["shots"]["structured"],
                "sparse-shots": setup["shots"]["sparse"], "nm-select": setup.get("nm_select", default("nm_select")),
                "damp-a": setup.get("damp_a", default("damp_a"))}
    flags = [f"--eval-windows {evaluated_windows(setup['evaluation'])}"]
    flags += ["--split valid"] if "valid.txt" in setup["evaluation"] else []
    flags += [f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}"
              for name, value in recorded.items() if value != default(name.replace("-", "_"))]
    flags += [f"--lora-rank {setup['lora']['rank']} --lora-steps {setup['lora']['steps']}"] if setup.get("lora") else []
    flags += ["--eval-bf16"] if any(r.get("eval_dtype", "float32") != "float32" for r in runs) else []
    only = " ".join(f"{r['method']}/{r['structure']}/{r['target']:g}" for r in runs)
    return f"python bench/prune_matrix.py {' '.join(flags)} --out {os.path.relpath(out.resolve(), ROOT)} --only {only}"


def write_table(out: Path) -> None:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    dense = [json.loads(p.read_text()) for p in sorted(out.glob("dense_*.json"))]
    if not runs:
        return
    dense_ppl = dense[0]["ppl"] if dense else float("nan")
    order = {"surgeon": 0, "sparsegpt": 1, "wanda": 2, "slicegpt": 3, "flap": 4, "flap-kind": 5, "wanda-sp": 6,
             "k-obd": 7, "l-obd": 8, "magnitude": 9}
    runs.sort(key=lambda r: (r["structure"] != "structured", r["structure"], -r["target"], order[r["method"]]))
    lines = ["# Pruning SmolLM2-135M: method × structure × target", "",
             f"- Model: {runs[0]['model']}; dense PPL {dense_ppl:.2f}"
             + (f" (the same windows scored in `{dense[0]['copied_from']}`)" if dense and "copied_from" in dense[0]
                else ""),
             f"- Calibration: {runs[0]['calibration']}; shots: {runs[0]['shots']}"
             + (f"; low-rank corrections after each shot (the one-shot peers: after their pruning, as many steps as "
                f"all shots together, masked to the weights they kept): rank {runs[0]['lora']['rank']}, "
                f"{runs[0]['lora']['steps']} Adam steps per shot on the calibration windows"
                if runs[0].get("lora") else ""),
             f"- Evaluation: {runs[0]['evaluation']}",
             f"- Command: `{command_line(out, runs)}`",
             f"- Machine: {runs[0]['machine']['platform']}, {runs[0]['machine']['cpus']} CPUs, torch "
             f"{runs[0]['machine']['torch']}; commits {sorted({r['machine']['commit'] for r in runs})}",
             "- Target: fraction of prunable parameters kept (structured: parameters of the exact groups — heads "
             "and MLP neurons; the residual stream is not pruned; unstructured / N:M: weights of all linear layers "
             "except the tied output head). SliceGPT instead slices the residual stream to round(target × 576) "
             "channels, so its `linear kept` equals the target and it also shrinks the embedding (hence its "
             "lower `params kept`). `params kept` is of the whole model, `linear kept` of its linear "
             "layers.",
             "- Prune time: wall time of the pruning call on the 2-core box (load average in each JSON). For the "
             "KFAC-based methods (surgeon, k-obd, l-obd) it excludes the first shot's curvature of the dense "
             "model, which the matrix collects once and shares (its time is in the analysis and, for caches "
             "written from now on, in `prune_matrix_cache/*.json`). Peak RSS is the whole process, which holds "
             "that shared curvature of every layer, so it overstates each method's own need.",
             "- N:M: L-OBD (cost w²·A_jj) and K-OBD (w²·G_ii·A_jj) keep the same weights, so their rows agree: a "
             "group of M weights lies in one output row i, where G_ii is a common factor, and neither updates "
             "the weights it keeps.",
             *precision_note(runs), "",
             "| structure | target | method | PPL | Δ vs dense | params kept | linear kept | prune time (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mark = " †" if r.get("eval_dtype", "float32") != "float32" else ""
        lines.append(f"| {r['structure']} | {r['target']:.2f} | {r['method']} | {r['ppl']:.2f}{mark} | "
                     f"{(r['ppl'] / dense_ppl - 1) * 100:+.0f}% | {r['params_after'] / r['params_before']:.3f} | "
                     f"{r['linear_kept']:.3f} | {r['prune_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    (out.parent / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    (out.parent / f"{out.name}.json").write_text(json.dumps({"dense": dense, "runs": runs}, indent=1))
    sizes = json.loads((out / "layer_sizes.json").read_text())
    for structure in sorted({r["structure"] for r in runs}):  # one plot per structure and target
        targets = sorted({r["target"] for r in runs if r["structure"] == structure}, reverse=True)
        for target in targets:
            chosen = [r for r in runs if r["structure"] == structure and r["target"] == target]
            tag = structure.replace(":", "of") + (f"_{target:g}" if len(targets) > 1 else "")
            folder = out.parent / f"{out.name}_{tag}"
            folder.mkdir(exist_ok=True)
            plot_kept({f"{r['method']} {r['target']:g}": rows_of(r, sizes) for r in chosen}, folder)


def precision_note(runs: list[dict]) -> list[str]:
    """The table's line on bf16-evaluated rows (marked †): how many and their largest float32 check error."""
    bf16 = [r for r in runs if r.get("eval_dtype", "float32") != "float32"]
    if not bf16:
        return []
    worst = max(bf16, key=lambda r: abs(r["bf16_rel_error"]))
    return [f"- Precision: rows marked † were scored under bfloat16 autocast (`--eval-bf16`, cross-entropy in "
            f"float32); each also scored its first {CHECK_WINDOWS} windows in float32: largest |PPL_bf16 / "
            f"PPL_fp32 − 1| over these {len(bf16)} rows {abs(worst['bf16_rel_error']) * 100:.3f}% "
            f"({worst['method']} {worst['structure']} {worst['target']:g}); the other rows are float32."]


def rows_of(run: dict, sizes: dict[str, int]) -> list[LayerRow]:
    """The run's kept fractions as report rows (weights per layer from the dense model)."""
    return [LayerRow(name, layer_role(name, "Linear"), layer_depth(name), sizes[name], round(frac * sizes[name]))
            for name, frac in run["layer_kept"].items()]


if __name__ == "__main__":
    main()
