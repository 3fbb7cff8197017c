"""Cost of KFAC collection on SmolLM2-135M: seconds and peak memory per 1,000 calibration tokens.

Side by side in one process, medians of `--reps` repetitions over the same `--windows` × `--length` windows:
  plain      forward + backward with the parameters trainable (what a naive implementation runs)
  plain_act  forward + backward with frozen parameters (activation gradients only, no hooks)
  empirical  collect_kfac(fisher="empirical")
  sampled    collect_kfac(fisher="sampled", samples=1)
The hook overhead is empirical / plain (goal ≤ 1.3×); empirical / plain_act isolates the factor products.
Peak memory is the process peak RSS (resource.getrusage, monotone over the run).  `--full` instead runs one
empirical collection over 128 × 512 windows and reports its time and peak RSS (run it in its own process);
`--nearest` times classic collection against fisher_approx="nearest" (classic pass + `--power-iters` passes),
interleaved, medians of `--reps`.
`--md` only renders docs/results/curvature_bench.md from the JSON files present.

Usage: python bench/curvature_bench.py [--windows 4 --length 512 --reps 3] [--full | --nearest | --md]
       [--threads 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon_fx.passes.curvature import collect_kfac  # noqa: E402
from surgeon_fx.data import calibration_windows, read_text, tokenize  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402

CALIB = ROOT / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_step(model, windows, trainable: bool) -> None:
    """Forward + backward of the summed next-token loss, one window at a time."""
    flags = [p.requires_grad for p in model.parameters()]
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_())
    try:
        for w in windows.split(1):
            logits = model(w).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
            loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        if not trainable:
            hook.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "git_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def side_by_side(model, windows, reps: int) -> dict:
    runs = {
        "plain": lambda: plain_step(model, windows, trainable=True),
        "plain_act": lambda: plain_step(model, windows, trainable=False),
        "empirical": lambda: collect_kfac(model, windows, progress=False),
        "sampled": lambda: collect_kfac(model, windows, fisher="sampled", samples=1, progress=False),
    }
    times = {k: [] for k in runs}
    peaks = {}
    for _ in range(reps):
        for name, fn in runs.items():
            times[name].append(timed(fn))
            peaks[name] = peak_rss_mib()
    kilotokens = windows.numel() / 1000
    res = {name: {"s_per_1k_tokens": statistics.median(t) / kilotokens, "seconds": t,
                  "peak_rss_mib_after": peaks[name]} for name, t in times.items()}
    med = {k: statistics.median(t) for k, t in times.items()}
    res["ratios"] = {f"{k}/{b}": med[k] / med[b] for k in ("empirical", "sampled") for b in ("plain", "plain_act")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="one empirical run over 128 × 512 windows")
    ap.add_argument("--nearest", action="store_true", help="one nearest-KFAC run (streamed power iteration)")
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--md", action="store_true", help="only render the markdown summary")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared box)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.md:
        out.mkdir(parents=True, exist_ok=True)
        (out / "curvature_bench.md").write_text(render_md(out))
        return
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    ids = tokenize(tokenizer, read_text(str(CALIB)))
    rss_model = peak_rss_mib()
    report = {"machine": machine(), "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
              "calibration": "wikitext-2 valid.txt", "peak_rss_mib_after_load": rss_model}
    if args.full:
        windows = calibration_windows(ids, 128, 512, seed=0)
        seconds = timed(lambda: collect_kfac(model, windows, progress=False))
        report.update({"windows": 128, "length": 512, "fisher": "empirical", "seconds": seconds,
                       "s_per_1k_tokens": seconds / (windows.numel() / 1000), "peak_rss_mib": peak_rss_mib()})
        name = "curvature_bench_full"
    elif args.nearest:
        windows = calibration_windows(ids, args.windows, args.length, seed=0)
        kfac_t, near_t = [], []
        for _ in range(args.reps):  # interleaved, medians
            kfac_t.append(timed(lambda: collect_kfac(model, windows, progress=False)))
            near_t.append(timed(lambda: collect_kfac(model, windows, progress=False, fisher_approx="nearest",
                                                     power_iters=args.power_iters)))
        kfac_s, near_s = statistics.median(kfac_t), statistics.median(near_t)
        report.update({"windows": args.windows, "length": args.length, "power_iters": args.power_iters,
                       "reps": args.reps, "classic_seconds": kfac_t, "nearest_seconds": near_t,
                       "seconds_per_power_pass": (near_s - kfac_s) / args.power_iters,
                       "power_pass_over_classic_pass": (near_s - kfac_s) / args.power_iters / kfac_s,
                       "peak_rss_mib": peak_rss_mib()})
        name = "curvature_bench_nearest"
    else:
        windows = calibration_windows(ids, args.windows, args.length, seed=0)
        collect_kfac(model, windows[:1, :64], progress=False)  # warm-up (allocator, kernels)
        report.update({"windows": args.windows, "length": args.length, "reps": args.reps,
                       "results": side_by_side(model, windows, args.reps), "peak_rss_mib": peak_rss_mib()})
        name = "curvature_bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "curvature_bench.md").write_text(render_md(out))
    print(json.dumps(report, indent=2))


def render_md(out: Path) -> str:
    """Markdown summary of whichever of the three JSON reports exist in `out`."""
    lines = ["# Curvature collection cost (SmolLM2-135M, CPU)", ""]
    side = out / "curvature_bench.json"
    if side.exists():
        r = json.loads(side.read_text())
        m = r["machine"]
        lines += [f"Side by side, medians of {r['reps']} repetitions over {r['windows']} × {r['length']} tokens, "
                  f"{m.get('threads', '?')} torch thread(s); {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
                  f"commit {m['git_commit'][:10]}, {m['date']}. Peak RSS of the whole process: "
                  f"{r['peak_rss_mib']:.0f} MiB (after loading the model: {r['peak_rss_mib_after_load']:.0f} MiB).", "",
                  "| run | s / 1k tokens | all repetitions (s) |", "|---|---|---|"]
        for k in ("plain", "plain_act", "empirical", "sampled"):
            v = r["results"][k]
            lines.append(f"| {k} | {v['s_per_1k_tokens']:.2f} | {', '.join(f'{t:.1f}' for t in v['seconds'])} |")
        lines += ["", "| ratio (median time) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in r["results"]["ratios"].items()]
        lines.append("")
    for fname, title in (("curvature_bench_full.json", "Full scale (one run)"),
                         ("curvature_bench_nearest.json", "Nearest KFAC (streamed power iteration)")):
        if (out / fname).exists():
            r = json.loads((out / fname).read_text())
            keep = {k: v for k, v in r.items() if k not in ("machine",)}
            lines += [f"## {title}", "", f"commit {r['machine']['git_commit'][:10]}, {r['machine']['date']}", "",
                      "| key | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else
                      f"| {k} | {', '.join(f'{t:.1f}' for t in v)} |" if isinstance(v, list) else
                      f"| {k} | {v} |" for k, v in keep.items()]
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
