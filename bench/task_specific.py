"""Task-specific compression (the paper's per-task result, offline): SmolLM2-135M pruned with LLM Surgeon,
structured, 0.8 of the prunable parameters kept, calibrated once on Python source and once on English text,
each pruned model evaluated on held-out Python source and on WikiText-2 test.

    python bench/task_specific.py            # runs what is missing (resumable), then writes the table and plot
    python bench/task_specific.py --table    # only the table and plot from the finished runs

Data (all offline):
- code: the top-level modules of the running Python's standard library
  (``sysconfig.get_paths()["stdlib"]``); calibration from ``[a-m]*.py``, evaluation on ``[n-z]*.py``: disjoint
  files, each set joined in path order (`surgeon_fx.data.read_text` on the glob, as ``--calib-file`` does).
- English: calibration from WikiText-2 ``valid.txt``, evaluation on WikiText-2 raw ``wiki.test.raw``.
Calibration: `--calib-windows` random windows of `--calib-length` tokens (seed 0) from the calibration text.
Evaluation: the first `--eval-windows` non-overlapping 2048-token windows of each evaluation text.
Each run is saved to ``docs/results/task_specific/<calibration>.json`` when it finishes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon_fx.compile import prunable_groups, run_pruning  # noqa: E402
from surgeon_fx.data import calibration_windows, eval_windows, read_text, text_files, tokenize  # noqa: E402
from surgeon_fx.evaluate import perplexity  # noqa: E402
from surgeon_fx.graph import build_graph  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402
from surgeon_fx.methods import RunContext  # noqa: E402
from surgeon_fx.passes.rewrite import shrink  # noqa: E402
from surgeon_fx.progress import Progress  # noqa: E402
from surgeon_fx.recipe import Recipe  # noqa: E402
from surgeon_fx.report import environment  # noqa: E402
from surgeon_fx.zoo import data_file  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CALIBRATION = {"code": str(STDLIB / "[a-m]*.py"), "english": str(data_file("wikitext-2/valid.txt"))}
EVALUATION = {"code": str(STDLIB / "[n-z]*.py"), "english": str(data_file("wikitext-2-raw/wiki.test.raw"))}
LABELS = {"code": "Python stdlib", "english": "WikiText-2"}
OUT = ROOT / "docs/results"
RUNS = OUT / "task_specific"


def source_note(source: str) -> str:
    files = text_files(source)
    return f"{source} ({len(files)} file{'s' if len(files) > 1 else ''})"


def shown(text: str) -> str:
    """A recorded source path as the table shows it: the standard library as `<stdlib>`, the data folder as
    `../shared/data` (the records keep the full paths of the machine that ran)."""
    for full, short in ((str(STDLIB), "<stdlib>"), (str(data_file("")), "../shared/data/")):
        text = text.replace(full.rstrip("/") + "/", short.rstrip("/") + "/")
    return text.replace("/work/wt-users/../shared/data/", "../shared/data/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--calib-length", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--table", action="store_true", help="only write the table and plot from finished runs")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.table:
        run_missing(args)
    write_table()


def run_missing(args) -> None:
    todo = [c for c in CALIBRATION if not (RUNS / f"{c}.json").exists()]
    if not todo and (RUNS / "dense.json").exists():
        return
    progress = Progress("lines")
    model, tokenizer = load_smollm2()  # one model in memory at a time: the box is shared
    evals = {k: eval_windows(tokenize(tokenizer, read_text(src)), 2048, limit=args.eval_windows)
             for k, src in EVALUATION.items()}
    progress.line("model and evaluation data loaded")
    setup = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
             "evaluation": {k: f"first {len(w)} x 2048-token windows of {source_note(EVALUATION[k])}"
                            for k, w in evals.items()},
             "load_average_at_start": os.getloadavg()}
    if not (RUNS / "dense.json").exists():
        start = time.perf_counter()
        ppl = {k: perplexity(model, w).ppl for k, w in evals.items()}
        progress.line(f"dense: {ppl}")
        (RUNS / "dense.json").write_text(json.dumps({"ppl": ppl, "eval_s": time.perf_counter() - start, **setup,
                                                     "environment": environment()}, indent=1))
    recipe = Recipe(structure="structured", target=args.target, method="surgeon", shots=args.shots,
                    calib_windows=args.calib_windows, calib_length=args.calib_length)
    recipe.check()
    for calib_name in todo:
        ids = tokenize(tokenizer, read_text(CALIBRATION[calib_name]))
        calib = calibration_windows(ids, args.calib_windows, args.calib_length, seed=0)
        pruned = model if model is not None else load_smollm2()[0]
        model = None
        n0 = sum(p.numel() for p in pruned.parameters())
        graph = build_graph(pruned, (calib[:1, :64],))
        start = time.perf_counter()
        outcome = run_pruning(pruned, recipe, prunable_groups(graph, 1), calib, RunContext(lines=progress.line))
        shrink(pruned, graph, {g: u for g, u in outcome.removed.items() if u})
        prune_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl = {k: perplexity(pruned, w).ppl for k, w in evals.items()}
        progress.line(f"calibrated on {calib_name}: {ppl}")
        n1 = sum(p.numel() for p in pruned.parameters())
        record = {"calibration": calib_name, "calibration_source": source_note(CALIBRATION[calib_name]),
                  "calibration_tokens": int(ids.numel()), "calibration_windows": list(calib.shape),
                  "recipe": {"structure": str(recipe.structure), "target": recipe.target, "method": recipe.method,
                             "shots": recipe.shots, "update": recipe.update},
                  "ppl": ppl, "params_before": n0, "params_after": n1, "prune_s": prune_s,
                  "eval_s": time.perf_counter() - start, "shots": outcome.shots, **setup, "environment": environment()}
        (RUNS / f"{calib_name}.json").write_text(json.dumps(record, indent=1))
        del pruned


def write_table() -> None:
    dense_file = RUNS / "dense.json"
    runs = {c: json.loads((RUNS / f"{c}.json").read_text()) for c in CALIBRATION if (RUNS / f"{c}.json").exists()}
    if not dense_file.exists() or not runs:
        return
    dense = json.loads(dense_file.read_text())
    first = next(iter(runs.values()))
    envs = [r["environment"] for r in runs.values()] + [dense["environment"]]
    recipe = first["recipe"]
    lines = ["# Task-specific compression: calibrate on code or on English, evaluate on both", "",
             f"SmolLM2-135M, LLM Surgeon, {recipe['structure']}, {recipe['target']:g} of the prunable parameters "
             f"kept ({recipe['shots']} shot{'s' if recipe['shots'] > 1 else ''}, `{recipe['update']}` update); "
             f"perplexity (lower is better).  Rows: calibration text; columns: evaluation text.", "",
             "| calibrated on | " + " | ".join(f"PPL on {LABELS[k]}" for k in EVALUATION) + " | params | prune (s) |",
             "|---|" + "---|" * len(EVALUATION) + "---|---|",
             "| dense (not pruned) | " + " | ".join(f"{dense['ppl'][k]:.2f}" for k in EVALUATION)
             + f" | {first['params_before'] / 1e6:.1f} M | — |"]
    for c, r in runs.items():
        cells = [f"**{r['ppl'][k]:.2f}**" if k == c else f"{r['ppl'][k]:.2f}" for k in EVALUATION]
        lines.append(f"| {LABELS[c]} | " + " | ".join(cells) + f" | {r['params_after'] / 1e6:.1f} M | "
                     f"{r['prune_s']:.0f} |")
    lines += ["", "Bold: evaluated on the kind of text it was calibrated on."]
    if len(runs) == len(CALIBRATION):
        gain = {k: runs[c]["ppl"][k] for c in runs for k in EVALUATION if k != c}
        lines += ["", "Each pruned model is best on the kind of text it was calibrated on: "
                  + "; ".join(f"on {LABELS[k]} {runs[k]['ppl'][k]:.2f} calibrated on it against {gain[k]:.2f} "
                              f"calibrated on the other text (dense {dense['ppl'][k]:.2f})" for k in EVALUATION)
                  + ".  The same parameter budget is spent on what the calibration text uses: the paper's "
                  "task-specific result, here with data that ships with Python and WikiText-2."]
    lines += ["",
              "![perplexity by calibration and evaluation text](task_specific.png)", "", "## Setup", ""]
    lines += [f"- Calibration ({LABELS[c]}): {r['calibration_windows'][0]} random windows x "
              f"{r['calibration_windows'][1]} tokens (seed 0) of {shown(r['calibration_source'])}, "
              f"{r['calibration_tokens']:,} tokens in all" for c, r in runs.items()]
    lines += [f"- Evaluation ({LABELS[k]}): {shown(first['evaluation'][k])}" for k in EVALUATION]
    lines += [f"- `<stdlib>` = the standard library of the Python that ran ({shown(str(STDLIB))} here)."]
    lines += ["- Code split: the standard library's top-level modules, `[a-m]*.py` for calibration and `[n-z]*.py` "
              "for evaluation (disjoint files; the Python that ran, see below).",
              f"- Model: {first['model']}.",
              f"- Machine: {envs[0]['cpus']} CPUs ({envs[0]['os']}), Python {envs[0]['python']}, torch "
              f"{envs[0]['torch']}; load average when the script that made each row started: "
              + "; ".join(f"{name} {', '.join(f'{x:.1f}' for x in r['load_average_at_start'])}"
                          for name, r in {"dense": dense, **runs}.items())
              + " (times are wall clock at that load).",
              f"- Commits: {', '.join(sorted({e['git_commit'] for e in envs}))}; dates: "
              f"{', '.join(sorted({e['date'][:10] for e in envs}))}.",
              "- Command: `python bench/task_specific.py` (runs land in `docs/results/task_specific/`).", ""]
    (OUT / "task_specific.md").write_text("\n".join(lines), encoding="utf-8")
    table = {"dense": dense["ppl"], **{c: r["ppl"] for c, r in runs.items()}, "recipe": recipe}
    (OUT / "task_specific.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    plot(dense["ppl"], {c: r["ppl"] for c, r in runs.items()}, OUT / "task_specific.png")


def plot(dense: dict, runs: dict, path: Path) -> None:
    """Grouped bars: one group per evaluation text, one bar per calibration text, dense as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(runs)
    for i, (c, ppl) in enumerate(runs.items()):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(EVALUATION))]
        ax.bar(xs, [ppl[k] for k in EVALUATION], width, label=f"calibrated on {LABELS[c]}")
    ax.scatter(range(len(EVALUATION)), [dense[k] for k in EVALUATION], color="black", marker="_", s=900,
               zorder=3, label="dense")
    ax.set_xticks(range(len(EVALUATION)), [f"evaluated on {LABELS[k]}" for k in EVALUATION])
    ax.set_ylabel("perplexity")
    ax.set_title("SmolLM2-135M, LLM Surgeon structured 0.8")
    ax.legend(fontsize=8, markerscale=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
