"""LLM Surgeon structured pruning of SmolLM2-135M: correlated update vs none, and the damping of the factors.

    python bench/surgeon_ablation.py [--target 0.9]

Same data and dense curvature as `bench/prune_matrix.py` (its cached dense factors are reused when present),
one shot; writes docs/results/surgeon_ablation.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prune_matrix import DATA, OUT, dense_factors, machine  # noqa: E402
from passes.rewrite import shrink  # noqa: E402
from passes.surgeon import SurgeonConfig, prune  # noqa: E402
from surgeon_fx.compile import prunable_groups  # noqa: E402
from surgeon_fx.data import calibration_windows, eval_windows, read_text, tokenize  # noqa: E402
from surgeon_fx.evaluate import perplexity  # noqa: E402
from surgeon_fx.graph import build_graph  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402

VARIANTS = [{"update": "correlated"}, {"update": "none"},
            {"update": "correlated", "damp_a": 0.1, "damp_g": 0.1},
            {"update": "correlated", "damp_a": 1.0, "damp_g": 1.0}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--eval-windows", type=int, default=4)
    args = ap.parse_args()
    model, tok = load_smollm2()
    calib = calibration_windows(tokenize(tok, read_text(DATA / "wikitext-2/valid.txt")), 8, 512, seed=0)
    evals = eval_windows(tokenize(tok, read_text(DATA / "wikitext-2-raw/wiki.test.raw")), 2048,
                         limit=args.eval_windows)
    graph = build_graph(model, (calib[:1, :64],))
    groups = prunable_groups(graph, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    factors = dense_factors(model, calib, graph, OUT / f"dense_factors_{len(calib)}x{calib.shape[1]}.pt")
    rows = []
    for variant in VARIANTS:
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        config = SurgeonConfig(structure="structured", target=args.target, shots=1, curvature="kfac", **variant)
        result = prune(pruned, calib, groups, config, collect_curvature=lambda m, w: factors)
        shrink(pruned, graph, {g: u for g, u in result.removed.items() if u})
        rows.append({**variant, "ppl": perplexity(pruned, evals).ppl, "seconds": time.perf_counter() - start,
                     "params": sum(p.numel() for p in pruned.parameters())})
        print(rows[-1], flush=True)
    record = {"target": args.target, "calibration": "8 x 512 tokens, wikitext-2 valid.txt, seed 0",
              "evaluation": f"first {len(evals)} x 2048-token windows of wikitext-2-raw wiki.test.raw",
              "rows": rows, "machine": machine()}
    out = ROOT / "docs/results"
    (out / "surgeon_ablation.json").write_text(json.dumps(record, indent=1))
    lines = [f"# LLM Surgeon structured {args.target:g} on SmolLM2-135M: update and damping", "",
             f"{record['calibration']}; {record['evaluation']}; one shot; machine {record['machine']['platform']}, "
             f"commit {record['machine']['commit']}, {record['machine']['date']}. Command: "
             f"`python bench/surgeon_ablation.py --target {args.target:g}`.", "",
             "| update | damping A | damping G | PPL | parameters |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['update']} | {r.get('damp_a', 0.01):g} | {r.get('damp_g', 0.01):g} | {r['ppl']:.2f} | "
                     f"{r['params']:,} |")
    (out / "surgeon_ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
