"""LLM Surgeon's unstructured / N:M update rules against SparseGPT on SmolLM2-135M, side by side in one process.

    python bench/fast_update.py                   # every run not yet measured, then the table
    python bench/fast_update.py --only surgeon/unstructured sparsegpt/unstructured
    python bench/fast_update.py --table           # rebuild the run table from finished runs
    python bench/fast_update.py --layer-timing    # the update rules alone on one decoder block's shapes

Same data as `bench/prune_matrix.py` (calibration: `--calib-windows` × `--calib-length` tokens of wikitext-2
valid.txt, seed 0; evaluation: the first `--eval-windows` 2048-token windows of wikitext-2-raw wiki.test.raw),
one shot, default damping.  LLM Surgeon's selection is the same for every rule (global threshold or N:M on the
KFAC costs of the dense model, whose curvature is collected once and shared, as in the matrix); only the update
of the remaining weights differs:

* `surgeon`        `sweep_update` with its default refinement (the driver as shipped);
* `surgeon-sweep`  `sweep_update(refine=0)`, SparseGPT's column sweep alone;
* `surgeon-exact`  `rowwise_update`, one Cholesky per row (the rule before the sweep; slow, so it runs last).

The two variants swap the driver's update function for the duration of their run (`mock.patch`); nothing else
changes.  Prune time excludes the shared dense curvature, like the matrix; its time is reported beside it.
Each run is written to docs/results/fast_update/<id>.json as it finishes, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prune_matrix import CACHE, DATA, PeakRSS, dense_factors, machine, shared_first_shot  # noqa: E402
from surgeon_fx.compile import run_pruning  # noqa: E402
from surgeon_fx.data import calibration_windows, eval_windows, read_text, tokenize  # noqa: E402
from surgeon_fx.evaluate import perplexity  # noqa: E402
from surgeon_fx.graph import build_graph  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402
from surgeon_fx.methods import RunContext  # noqa: E402
from surgeon_fx.passes import surgeon  # noqa: E402
from surgeon_fx.passes.costs import element_costs  # noqa: E402
from surgeon_fx.passes.sparsegpt import sparsegpt_prune_layer  # noqa: E402
from surgeon_fx.passes.update import rowwise_update, sweep_update  # noqa: E402
from surgeon_fx.recipe import Recipe  # noqa: E402

RESULTS = ROOT / "docs/results/fast_update"
RULES = {"surgeon": None,
         "surgeon-sweep": lambda W, A, removed: sweep_update(W, A, removed, refine=0),
         "surgeon-exact": lambda W, A, removed: rowwise_update(W, torch.linalg.inv(A), removed)}
RUNS = ["sparsegpt/unstructured", "surgeon/unstructured", "surgeon-sweep/unstructured", "sparsegpt/2:4",
        "surgeon/2:4", "surgeon-exact/unstructured"]


def run_one(name: str, model, calib, evals, factors: dict, curvature_s: float) -> dict:
    variant, structure = name.split("/")
    method = "sparsegpt" if variant == "sparsegpt" else "surgeon"
    recipe = Recipe(structure=structure, target=0.5, method=method, shots=1)
    recipe.check()
    pruned = copy.deepcopy(model)
    collect = None
    if method == "surgeon":
        share = shared_first_shot(factors)
        layers = surgeon.pruned_layers(pruned, None)
        collect = lambda m, w: share(m, w, layers)  # noqa: E731
    rule = RULES.get(variant)
    patch = mock.patch.object(surgeon, "sweep_update", rule) if rule is not None else contextlib.nullcontext()
    with patch, PeakRSS() as rss:
        start = time.perf_counter()
        run_pruning(pruned, recipe, None, calib, RunContext(collect_curvature=collect))
        seconds = time.perf_counter() - start
    start = time.perf_counter()
    ppl = perplexity(pruned, evals).ppl
    return {"run": name, "variant": variant, "structure": structure, "target": 0.5, "ppl": ppl, "prune_s": seconds,
            "dense_curvature_s": curvature_s if method == "surgeon" else None,
            "eval_s": time.perf_counter() - start, "peak_rss_mib": rss.peak,
            "calibration": f"{calib.shape[0]} x {calib.shape[1]} tokens, wikitext-2 valid.txt, seed 0",
            "evaluation": f"first {len(evals)} x 2048-token windows of wikitext-2-raw wiki.test.raw",
            "machine": machine()}


def layer_timing() -> dict:
    """Seconds of each update rule on SmolLM2's seven layer shapes of one decoder block (out, in), 50 % removed
    by the element costs with G = I, and of SparseGPT's layer routine on the same A (its own mask).  A is a
    random damped Gram matrix with input scales spread over e⁰…e³: the work does not depend on the values."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
              "up": (1536, 576), "down": (576, 1536)}
    seconds = {}
    for name, (out, inn) in shapes.items():
        X = torch.randn(4 * inn, inn, generator=gen, dtype=torch.float64)
        X = X * (torch.rand(inn, generator=gen, dtype=torch.float64) * 3).exp()
        A = X.t() @ X / X.shape[0]
        A += 0.01 * A.diagonal().mean() * torch.eye(inn, dtype=torch.float64)
        A_inv = torch.cholesky_inverse(torch.linalg.cholesky(A))
        W = torch.randn(out, inn, generator=gen, dtype=torch.float64) * 0.02
        cost = element_costs(W, torch.ones(out, dtype=torch.float64), A_inv.diagonal())
        removed = cost <= cost.flatten().kthvalue(cost.numel() // 2).values
        rules = {"sweep (refine 0)": lambda: sweep_update(W, A, removed, refine=0),
                 "sweep + refine 3 (driver)": lambda: sweep_update(W, A, removed),
                 "SparseGPT layer": lambda: sparsegpt_prune_layer(W.float(), A.float(), sparsity=0.5),
                 "exact (rowwise_update)": lambda: rowwise_update(W, A_inv, removed)}
        for rule, fn in rules.items():
            start = time.perf_counter()
            fn()
            seconds.setdefault(rule, {})[name] = time.perf_counter() - start
        print(name, {r: round(v[name], 2) for r, v in seconds.items()}, flush=True)
    return {"seconds": seconds, "block_total": {r: sum(v.values()) for r, v in seconds.items()},
            "threads": torch.get_num_threads(), "machine": machine()}


def write_table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    rows.sort(key=lambda r: RUNS.index(r["run"]) if r["run"] in RUNS else len(RUNS))
    gpt = {r["structure"]: r["prune_s"] for r in rows if r["variant"] == "sparsegpt"}
    lines = ["| run | PPL | prune (s) | ÷ SparseGPT prune | dense curvature (s, shared) | peak RSS (MiB) | load avg "
             "(1/5/15 min, at the end) | commit |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['prune_s'] / gpt[r['structure']]:.2f}" if r["structure"] in gpt else "–"
        curv = f"{r['dense_curvature_s']:.0f}" if r["dense_curvature_s"] else "–"
        load = "/".join(f"{x:.1f}" for x in r["machine"]["loadavg"])
        lines.append(f"| {r['run']} | {r['ppl']:.2f} | {r['prune_s']:.0f} | {ratio} | {curv} | "
                     f"{r['peak_rss_mib']:.0f} | {load} | {r['machine']['commit']} |")
    (RESULTS.parent / "fast_update_runs.md").write_text("\n".join(lines) + "\n")
    (RESULTS.parent / "fast_update.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-length", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--only", nargs="*", choices=RUNS)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--layer-timing", action="store_true")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.layer_timing:
        (RESULTS.parent / "fast_update_layers.json").write_text(json.dumps(layer_timing(), indent=1))
        return
    todo = [r for r in (args.only or RUNS) if not (RESULTS / f"{r.replace('/', '_').replace(':', 'of')}.json").exists()]
    if todo and not args.table:
        model, tokenizer = load_smollm2()
        calib = calibration_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2/valid.txt")),
                                    args.calib_windows, args.calib_length, seed=0)
        evals = eval_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2-raw/wiki.test.raw")), 2048,
                             limit=args.eval_windows)
        factors, curvature_s = None, None
        for name in todo:
            if not name.startswith("sparsegpt") and factors is None:
                cache = CACHE / f"dense_factors_{len(calib)}x{calib.shape[1]}.pt"
                start = time.perf_counter()
                factors = dense_factors(model, calib, build_graph(model, (calib[:1, :64],)), cache)
                meta = cache.with_suffix(".json")
                curvature_s = json.loads(meta.read_text())["seconds"] if meta.exists() else \
                    time.perf_counter() - start
            record = run_one(name, model, calib, evals, factors, curvature_s)
            (RESULTS / f"{name.replace('/', '_').replace(':', 'of')}.json").write_text(json.dumps(record, indent=1))
            print(f"{name}: PPL {record['ppl']:.2f}, prune {record['prune_s']:.0f} s", flush=True)
    write_table()


if __name__ == "__main__":
    main()
