"""Cost and error of cheaper perplexity evaluation on CPU: batched windows and bfloat16 autocast, SmolLM2-135M.

    python bench/eval_precision.py --windows 4

Evaluates the first `--windows` 2048-token windows of wikitext-2-raw wiki.test.raw with float32 one window per
forward pass (the reference), float32 `--batch` windows per pass, and bfloat16 autocast (matmuls in bf16,
cross-entropy in float32).  bf16 is adopted only where |PPL_bf16 / PPL_fp32 − 1| ≤ 0.1%.  Writes
docs/results/eval_precision.{md,json} with the machine, commit and load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRUNED = ROOT / "docs/results/eval_precision_pruned"  # --eval-bf16 matrix runs with their float32 check

from bench.prune_matrix import DATA, RESULTS, machine  # noqa: E402
from surgeon_fx.data import eval_windows, read_text, tokenize  # noqa: E402
from surgeon_fx.evaluate import perplexity  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402


def bf16_flags() -> str:
    """The CPU's bfloat16 instruction flags from /proc/cpuinfo (what decides whether bf16 autocast is faster)."""
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    found = sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f"})
    return "CPU flags " + ", ".join(found) if found else "no AVX-512 / AMX bf16 flags"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2, help="also time float32 with this many windows per pass (1: skip)")
    ap.add_argument("--table", action="store_true", help="only rewrite the pruned-model section of the table")
    args = ap.parse_args()
    if args.table:
        text = (RESULTS / "eval_precision.md").read_text().split("\n## Pruned models")[0].rstrip("\n")
        (RESULTS / "eval_precision.md").write_text("\n".join([text, *pruned_checks()]) + "\n")
        return
    model, tokenizer = load_smollm2()
    windows = eval_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2-raw/wiki.test.raw")), 2048,
                           limit=args.windows)
    rows = []
    settings = [("float32, batch 1", {}), ("bfloat16 autocast, batch 1", {"autocast": torch.bfloat16})]
    if args.batch > 1:
        settings.append((f"float32, batch {args.batch}", {"batch_size": args.batch}))
    for name, kw in settings:
        start = time.perf_counter()
        ppl = perplexity(model, windows, progress=False, **kw).ppl
        rows.append({"setting": name, "ppl": ppl, "seconds": time.perf_counter() - start,
                     "loadavg_after": os.getloadavg()})
        print(rows[-1], flush=True)
    ref = rows[0]["ppl"]
    for r in rows:
        r["rel_error"] = r["ppl"] / ref - 1
    record = {"windows": len(windows), "rows": rows, "machine": machine(),
              "command": f"python bench/eval_precision.py --windows {args.windows} --batch {args.batch}"}
    (RESULTS / "eval_precision.json").write_text(json.dumps(record, indent=1))
    lines = ["# Cheaper perplexity evaluation on CPU: batching and bfloat16 (SmolLM2-135M)", "",
             f"- Command: `{record['command']}`",
             f"- Windows: first {len(windows)} x 2048 tokens of wikitext-2-raw wiki.test.raw",
             f"- Machine: {record['machine']['platform']}, {record['machine']['cpus']} CPUs ({bf16_flags()}), "
             f"torch {record['machine']['torch']}, {record['machine']['threads']} threads; commit "
             f"{record['machine']['commit']}; {record['machine']['date']}; load average at start "
             f"{record['machine']['loadavg'][0]:.1f} (shared box: seconds are upper bounds)", "",
             "| setting | PPL | rel. error vs float32 | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['ppl']:.4f} | {r['rel_error'] * 100:+.3f}% | {r['seconds']:.0f} |" for r in rows]
    lines += pruned_checks()
    (RESULTS / "eval_precision.md").write_text("\n".join(lines) + "\n")


def pruned_checks() -> list[str]:
    """The float32 checks of pruned models scored with `prune_matrix.py --eval-bf16` (kept in PRUNED)."""
    runs = [json.loads(p.read_text()) for p in sorted(PRUNED.glob("*.json"))]
    if not runs:
        return []
    lines = ["", "## Pruned models", "",
             f"`python bench/prune_matrix.py --eval-windows 0 --eval-bf16` scores every run's first "
             f"{runs[0]['bf16_check']['windows']} test windows in float32 as well; the runs kept in "
             f"`{PRUNED.relative_to(ROOT)}/`:", "",
             "| run | PPL float32 | PPL bf16 | rel. error | commit |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} {r['structure']} {r['target']:g} | {r['bf16_check']['ppl_float32']:.4f} | "
              f"{r['bf16_check']['ppl_bf16']:.4f} | {r['bf16_rel_error'] * 100:+.3f}% | {r['machine']['commit']} |"
              for r in runs]
    worst = max(abs(r["bf16_rel_error"]) for r in runs)
    verdict = ("over the 0.1% allowed, so the published full-split tables are scored in float32"
               if worst > 0.001 else "within the 0.1% allowed")
    return lines + ["", f"Largest error on pruned models: {worst * 100:.3f}%, {verdict}."]


if __name__ == "__main__":
    main()
