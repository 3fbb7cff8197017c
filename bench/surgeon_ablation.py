"""LLM Surgeon on SmolLM2-135M: which update, which damping, how much calibration, how many shots.

    python bench/surgeon_ablation.py                          # every variant not yet measured
    python bench/surgeon_ablation.py --only consumer none     # some variants
    python bench/surgeon_ablation.py --table                  # rebuild the Markdown table

Structured pruning to `--target` (default 0.9) of the prunable parameters; data as in `bench/prune_matrix.py`
(calibration windows of wikitext-2 valid.txt, seed 0; the first `--eval-windows` 2048-token windows of
wikitext-2-raw wiki.test.raw).  The dense model's KFAC factors of each calibration size are cached beside the
matrix's, so every one-shot variant of a size shares them; later shots re-estimate on the pruned model.
Each variant is written to docs/results/surgeon_ablation/<name>.json as it finishes.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prune_matrix import CACHE, DATA, PeakRSS, dense_factors, machine, shared_first_shot  # noqa: E402
from surgeon_fx.passes.rewrite import shrink  # noqa: E402
from surgeon_fx.passes.surgeon import SurgeonConfig, prune, pruned_layers  # noqa: E402
from surgeon_fx.compile import prunable_groups  # noqa: E402
from surgeon_fx.data import calibration_windows, eval_windows, read_text, tokenize  # noqa: E402
from surgeon_fx.evaluate import perplexity  # noqa: E402
from surgeon_fx.graph import build_graph  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402

RESULTS = ROOT / "docs/results/surgeon_ablation"
# name -> (SurgeonConfig options, calibration windows of 512 tokens)
VARIANTS = {
    "k-obd": ({"curvature": "diag_ga"}, 8),
    "correlated": ({"update": "correlated"}, 8),
    "none": ({"update": "none"}, 8),
    "consumer": ({"update": "consumer"}, 8),
    "correlated-damp0.1": ({"update": "correlated", "damp_a": 0.1, "damp_g": 0.1}, 8),
    "consumer-damp0.1": ({"update": "consumer", "damp_a": 0.1}, 8),
    "consumer-damp0.001": ({"update": "consumer", "damp_a": 0.001}, 8),
    "k-obd-calib32": ({"curvature": "diag_ga"}, 32),
    "none-calib32": ({"update": "none"}, 32),
    "correlated-calib32": ({"update": "correlated"}, 32),
    "consumer-calib32": ({"update": "consumer"}, 32),
    "consumer-damp0.1-calib32": ({"update": "consumer", "damp_a": 0.1}, 32),
    "consumer-calib32-4shots": ({"update": "consumer", "shots": 4}, 32),
    "k-obd-calib32-4shots": ({"curvature": "diag_ga", "shots": 4}, 32),
}


def run_variant(name: str, model, tokenizer, graph, groups, evals, target: float) -> dict:
    options, n_calib = VARIANTS[name]
    calib = calibration_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2/valid.txt")), n_calib, 512, seed=0)
    factors = dense_factors(model, calib, graph, CACHE / f"dense_factors_{n_calib}x512.pt")
    pruned = copy.deepcopy(model)
    layers = pruned_layers(pruned, groups)
    share = shared_first_shot(factors)
    config = SurgeonConfig(**{"structure": "structured", "target": target, "shots": 1, "curvature": "kfac",
                              **options})
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = prune(pruned, calib, groups, config, collect_curvature=lambda m, w: share(m, w, layers))
        shrink(pruned, graph, {g: u for g, u in result.removed.items() if u})
        seconds = time.perf_counter() - start
    return {"name": name, "options": options, "calibration": f"{n_calib} x 512 tokens", "target": target,
            "shots": config.shots, "ppl": perplexity(pruned, evals).ppl, "prune_s": seconds,
            "peak_rss_mib": rss.peak, "params": sum(p.numel() for p in pruned.parameters()),
            "evaluation": f"first {len(evals)} x 2048-token windows of wikitext-2-raw wiki.test.raw",
            "machine": machine()}


def write_table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    order = list(VARIANTS)
    rows.sort(key=lambda r: (-r["target"], int(r["calibration"].split()[0]),
                             order.index(r["name"]) if r["name"] in order else len(order)))
    lines = ["# LLM Surgeon on SmolLM2-135M: update, damping, calibration and shots", "",
             "Structured pruning (heads and MLP neurons) of SmolLM2-135M; calibration windows of 512 tokens from "
             "wikitext-2 valid.txt (seed 0); perplexity on the first windows of wikitext-2-raw wiki.test.raw "
             "(column `eval`). Command: `python bench/surgeon_ablation.py`; each row's machine and commit are in "
             "`surgeon_ablation/<name>.json`. Damping is relative (× mean diagonal); the defaults are 0.01 for "
             "both factors. `correlated` updates producers (rows, via G) and consumers (columns, via A) of every "
             "removed unit; `consumer` only the consumers; `none` zeroes the removed units. `commit` is HEAD when the "
             "row was written: the 8e612b6 rows ran on the uncommitted code committed next as 396f549.", "",
             "| variant | target | update | damping A | damping G | calibration | shots | PPL | eval | prune (s) "
             "| commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["options"]
        update = "none (K-OBD: diagonal costs)" if o.get("curvature") == "diag_ga" else o.get("update", "correlated")
        lines.append(f"| {r['name']} | {r['target']:g} | {update} | "
                     f"{o.get('damp_a', 0.01):g} | {o.get('damp_g', 0.01):g} | {r['calibration']} | {r['shots']} | "
                     f"{r['ppl']:.2f} | {r['evaluation'].split(' x ')[0].replace('first ', '')} windows | "
                     f"{r['prune_s']:.0f} | {r['machine']['commit']} |")
    (ROOT / "docs/results/surgeon_ablation.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS))
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    todo = [n for n in (args.only or VARIANTS) if not (RESULTS / f"{n}_{args.target:g}.json").exists()]
    if todo and not args.table:
        model, tokenizer = load_smollm2()
        evals = eval_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2-raw/wiki.test.raw")), 2048,
                             limit=args.eval_windows)
        graph = build_graph(model, (evals[:1, :64],))
        groups = prunable_groups(graph, 1)
        for name in todo:
            record = run_variant(name, model, tokenizer, graph, groups, evals, args.target)
            (RESULTS / f"{name}_{args.target:g}.json").write_text(json.dumps(record, indent=1))
            print(f"{name}: PPL {record['ppl']:.2f} ({record['prune_s']:.0f} s)", flush=True)
    write_table()


if __name__ == "__main__":
    main()
