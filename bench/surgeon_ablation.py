"""LLM Surgeon on SmolLM2-135M: which update, which damping, how much calibration, how many shots.

    python bench/surgeon_ablation.py                          # every variant not yet measured
    python bench/surgeon_ablation.py --only consumer none     # some variants
    python bench/surgeon_ablation.py --table                  # rebuild the Markdown table

Structured pruning to `--target` (default 0.9) of the prunable parameters; data as in `bench/prune_matrix.py`
(calibration windows of wikitext-2 valid.txt, seed 0; the first `--eval-windows` 2048-token windows of
wikitext-2-raw wiki.test.raw, or with `--split valid` the first 2048-token windows of valid.txt that share no
token with the 32 × 512 calibration windows: the held-out text on which settings are chosen, so only the
32 × 512 variants run there; `--valid-avoid 64` takes windows avoiding the 64 × 512 ones, where the 64- and
32-window variants compare).  The dense model's KFAC factors of each calibration size are cached beside the
matrix's, so every one-shot variant of a size shares them; later shots re-estimate on the pruned model.
Each variant is written to docs/results/surgeon_ablation/<name>.json as it finishes.
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, replace
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prune_matrix import (CACHE, DATA, PeakRSS, dense_factors, evaluated_windows, machine,  # noqa: E402
                                shared_first_shot)
from surgeon_fx.passes.lora import lora_correct  # noqa: E402
from surgeon_fx.passes.rewrite import shrink  # noqa: E402
from surgeon_fx.passes.slicegpt import slice_residual  # noqa: E402
from surgeon_fx.passes.surgeon import SurgeonConfig, prune, pruned_layers  # noqa: E402
from surgeon_fx.compile import prunable_groups  # noqa: E402
from surgeon_fx.data import calibration_windows, eval_windows, read_text, tokenize, validation_windows  # noqa: E402
from surgeon_fx.evaluate import perplexity  # noqa: E402
from surgeon_fx.graph import build_graph  # noqa: E402
from surgeon_fx.groups import prunable_count  # noqa: E402
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
    "consumer-damp0.001-calib32": ({"update": "consumer", "damp_a": 0.001}, 32),
    "consumer-calib32-4shots": ({"update": "consumer", "shots": 4}, 32),
    "consumer-calib32-lora8": ({"update": "consumer", "lora_rank": 8, "lora_steps": 32}, 32),
    "consumer-calib32-lora8-64steps": ({"update": "consumer", "lora_rank": 8, "lora_steps": 64}, 32),
    # the same 64 LoRA steps split between shots (the paper's corrections between shots): each shot re-estimates
    # the curvature on the pruned and corrected model
    "consumer-calib32-2shots-lora8-32steps": ({"update": "consumer", "shots": 2, "lora_rank": 8, "lora_steps": 32}, 32),
    "consumer-calib32-4shots-lora8-16steps": ({"update": "consumer", "shots": 4, "lora_rank": 8, "lora_steps": 16}, 32),
    # the references: the dense model, and the same corrections trained on it (how much of their gain is
    # adaptation to the calibration text rather than repair of the pruning)
    "dense": ({"dense": True}, 32),
    "dense-lora8": ({"dense": True, "lora_rank": 8, "lora_steps": 32}, 32),
    "k-obd-calib32-4shots": ({"curvature": "diag_ga", "shots": 4}, 32),
    # twice the calibration tokens: compared with consumer-calib32 on validation windows avoiding all 64 windows
    "consumer-calib64": ({"update": "consumer"}, 64),
    "consumer-calib64-lora8": ({"update": "consumer", "lora_rank": 8, "lora_steps": 32}, 64),
    "consumer-calib64-lora8-64steps": ({"update": "consumer", "lora_rank": 8, "lora_steps": 64}, 64),
    # attention heads forced out: this share of the head groups' parameters goes first (same dense curvature,
    # so one shot), MLP neurons make up the rest of the target; 0.2 at target 0.8 is a uniform allocation
    "consumer-calib32-heads0.1": ({"update": "consumer", "head_share": 0.1}, 32),
    "consumer-calib32-heads0.2": ({"update": "consumer", "head_share": 0.2}, 32),
    # residual-stream channels removed first (SliceGPT's rotation to 544 of 576), then LLM Surgeon's groups to
    # the same non-embedding parameter count as the plain run at the target
    "consumer-calib32-residual544": ({"update": "consumer", "residual_width": 544}, 32),
}
HEAD_KINDS = ("heads", "kv_heads")


DEFAULT_TARGET, DEFAULT_EVAL_WINDOWS = 0.9, 4  # `--target`, `--eval-windows`
VALID_CALIB = 32  # validation windows are disjoint from the 32 x 512 calibration windows (`--valid-avoid`)


def eval_text(split: str, avoid: int) -> str:
    """The evaluation text of a split: the test file, or valid.txt minus the first `avoid` calibration windows."""
    return ("wikitext-2-raw wiki.test.raw" if split == "test"
            else f"wikitext-2 valid.txt disjoint from the {avoid} x 512 calibration windows")


def record_path(name: str, target: float, split: str, avoid: int = VALID_CALIB) -> Path:
    """Where a variant's row is written (a dense control's target is 1: nothing is pruned); `avoid`: the
    calibration windows the validation windows avoid, in the name when not the default."""
    target = 1.0 if VARIANTS[name][0].get("dense") else target
    suffix = ("_valid" + (str(avoid) if avoid != VALID_CALIB else "")) if split == "valid" else ""
    return RESULTS / f"{name}_{target:g}{suffix}.json"


def forced_heads(model, calib, groups, factors, config: SurgeonConfig, head_share: float) -> dict[str, list[int]]:
    """One shot that removes `head_share` of the head groups' parameters, then MLP neurons for the rest.

    Both stages price and update with the dense factors (`shared_first_shot`), and head units touch only
    attention layers while neuron units touch only MLP layers, so this is the one-shot LLM Surgeon with the
    allocation between heads and neurons fixed instead of chosen by cost.  With P_h, P_n the two stages'
    prunable parameters and target t: the neuron stage keeps 1 − ((1 − t)(P_h + P_n) − head_share·P_h) / P_n.
    Returns the removed units of every group."""
    heads = [g for g in groups if g.kind in HEAD_KINDS]
    rest = [g for g in groups if g.kind not in HEAD_KINDS]
    p_h, p_n = prunable_count(model, heads), prunable_count(model, rest)
    neuron_target = 1 - ((1 - config.target) * (p_h + p_n) - head_share * p_h) / p_n
    removed = {}
    for stage, target in ((heads, 1 - head_share), (rest, neuron_target)):
        layers = pruned_layers(model, stage)
        share = shared_first_shot(factors)
        result = prune(model, calib, stage, replace(config, target=target),
                       collect_curvature=lambda m, w: share(m, w, layers))
        removed.update(result.removed)
    return removed


def non_embedding(model) -> int:
    """Parameters outside the token embedding (the tied output head shares it)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def sliced_then_pruned(model, calib, graph, groups, config: SurgeonConfig, width: int) -> None:
    """Slice the residual stream to `width` (`slice_residual`), then prune heads and neurons with LLM Surgeon
    (curvature collected on the sliced model) to the non-embedding parameter count N₀ − (1 − t)·P₀ of the plain
    run (N₀, P₀: the dense model's non-embedding and prunable parameters): target t' = 1 − (N_s − N₀ + (1 − t)·P₀)
    / P_s on the sliced model's N_s, P_s.  `graph`: the dense model's (its names are `model`'s).  Shrinks `model`
    in place."""
    budget = non_embedding(model) - (1 - config.target) * prunable_count(model, groups)
    slice_residual(model, graph, calib, width)
    sliced_graph = build_graph(model, (calib[:1, :64],))
    sliced = [g for g in prunable_groups(sliced_graph, 1) if g.kind in HEAD_KINDS + ("neurons",)]
    target = 1 - (non_embedding(model) - budget) / prunable_count(model, sliced)
    result = prune(model, calib, sliced, replace(config, target=target))
    shrink(model, sliced_graph, {g: u for g, u in result.removed.items() if u})


def run_variant(name: str, model, tokenizer, graph, groups, evals, target: float, split: str,
                avoid: int = VALID_CALIB) -> dict:
    options, n_calib = VARIANTS[name]
    calib = calibration_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2/valid.txt")), n_calib, 512, seed=0)
    factors = dense_factors(model, calib, graph, CACHE / f"dense_factors_{n_calib}x512.pt")
    pruned = copy.deepcopy(model)
    layers = pruned_layers(pruned, groups)
    share = shared_first_shot(factors)
    config = SurgeonConfig(**{"structure": "structured", "target": target, "shots": 1, "curvature": "kfac",
                              **{k: v for k, v in options.items() if k not in ("dense", "head_share", "residual_width")}})
    with PeakRSS() as rss:
        start = time.perf_counter()
        if options.get("dense"):  # no pruning: at most the low-rank corrections, seeded as a first shot's
            logs = [{"lora_loss": lora_correct(pruned, calib, layers, {}, config.lora_rank, config.lora_steps,
                                               config.lora_lr, seed=config.seed)}] if config.lora_rank else []
        elif options.get("residual_width"):
            sliced_then_pruned(pruned, calib, graph, groups, config, options["residual_width"])
            logs = []
        elif options.get("head_share"):
            removed = forced_heads(pruned, calib, groups, factors, config, options["head_share"])
            shrink(pruned, graph, {g: u for g, u in removed.items() if u})
            logs = []
        else:
            result = prune(pruned, calib, groups, config, collect_curvature=lambda m, w: share(m, w, layers))
            shrink(pruned, graph, {g: u for g, u in result.removed.items() if u})
            logs = [asdict(log) for log in result.logs]
        seconds = time.perf_counter() - start
    return {"name": name, "options": options, "calibration": f"{n_calib} x 512 tokens",
            "target": 1.0 if options.get("dense") else target, "shot_logs": logs,
            "shots": 0 if options.get("dense") else config.shots, "ppl": perplexity(pruned, evals).ppl, "prune_s": seconds,
            "peak_rss_mib": rss.peak, "params": sum(p.numel() for p in pruned.parameters()),
            "evaluation": f"first {len(evals)} x 2048-token windows of {eval_text(split, avoid)}", "split": split,
            "valid_avoid": avoid,
            "machine": machine()}


def write_table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    order = list(VARIANTS)
    rows.sort(key=lambda r: (r.get("split", "test") == "test", r.get("valid_avoid", VALID_CALIB), -r["target"], int(r["calibration"].split()[0]),
                             order.index(r["name"]) if r["name"] in order else len(order)))
    lines = ["# LLM Surgeon on SmolLM2-135M: update, damping, calibration and shots", "",
             "Structured pruning (heads and MLP neurons) of SmolLM2-135M; calibration windows of 512 tokens from "
             "wikitext-2 valid.txt (seed 0); perplexity (column `eval`) on the first 2048-token windows of "
             "wikitext-2-raw wiki.test.raw (`test`) or, where settings are chosen, of valid.txt windows that share "
             "no token with the 32 x 512 calibration windows (`valid`, `--split valid`). Each row is measured again by "
             "`python bench/surgeon_ablation.py` with the row's `flags`; its machine and commit are in "
             "`surgeon_ablation/<name>.json`. Damping is relative (× mean diagonal); the defaults are 0.01 for "
             "both factors. `correlated` updates producers (rows, via G) and consumers (columns, via A) of every "
             "removed unit; `consumer` only the consumers; `none` zeroes the removed units. `commit` is HEAD when the "
             "row was written: the 8e612b6 rows ran on the uncommitted code committed next as 396f549, the 5e35e84 "
             "rows (forced heads, 64 x 512 calibration) on the code committed next with them, the 2d3a3c3 row "
             "(consumer-calib64-lora8) on the variant committed next as e0fd4b8.", "",
             "| variant | target | update | damping A | damping G | calibration | shots | PPL | eval | prune (s) "
             "| commit | flags |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["options"]
        update = "none (K-OBD: diagonal costs)" if o.get("curvature") == "diag_ga" else o.get("update", "correlated")
        update = "dense model, nothing pruned" if o.get("dense") else update
        if o.get("lora_rank"):
            update += f" + LoRA rank {o['lora_rank']}, {o['lora_steps']} steps"
            update += " after each shot" if o.get("shots", 1) > 1 else ""
        if o.get("head_share"):
            update += f", {o['head_share']:.0%} of head parameters forced out"
        if o.get("residual_width"):
            update += f", residual stream sliced to {o['residual_width']} first"
        lines.append(f"| {r['name']} | {r['target']:g} | {update} | "
                     f"{o.get('damp_a', 0.01):g} | {o.get('damp_g', 0.01):g} | {r['calibration']} | {r['shots']} | "
                     f"{r['ppl']:.2f} | {r['evaluation'].split(' x ')[0].replace('first ', '')} {split_label(r)} | "
                     f"{r['prune_s']:.0f} | {r['machine']['commit']} | `{flags_of(r)}` |")
    lines += lever_summary(rows) + chosen_on_validation(rows)
    (ROOT / "docs/results/surgeon_ablation.md").write_text("\n".join(lines) + "\n")


def flags_of(row: dict) -> str:
    """The flags of `python bench/surgeon_ablation.py` that measure this row again: its variant, target (a dense
    reference prunes nothing, so it needs none), evaluation windows and split."""
    windows = evaluated_windows(row["evaluation"])
    avoid = row.get("valid_avoid", VALID_CALIB)
    flags = [f"--target {row['target']:g}"] if row["target"] != DEFAULT_TARGET and row["target"] < 1 else []
    flags += [f"--eval-windows {windows}"] if windows != DEFAULT_EVAL_WINDOWS else []
    flags += ["--split valid"] if row.get("split") == "valid" else []
    flags += [f"--valid-avoid {avoid}"] if row.get("split") == "valid" and avoid != VALID_CALIB else []
    return " ".join(flags + [f"--only {row['name']}"])


# lever → (baseline variant, variant), both at target 0.8 on the same validation windows (`valid_avoid`)
LEVERS = [("update: consumer instead of none", "none-calib32", "consumer-calib32", VALID_CALIB),
          ("4 shots with re-estimated curvature instead of 1", "consumer-calib32", "consumer-calib32-4shots", VALID_CALIB),
          ("damping 0.1 instead of 0.01", "consumer-calib32", "consumer-damp0.1-calib32", VALID_CALIB),
          ("2x calibration tokens (64 x 512)", "consumer-calib32", "consumer-calib64", 64),
          ("LoRA rank 8, 32 steps", "consumer-calib32", "consumer-calib32-lora8", VALID_CALIB),
          ("2x calibration tokens (64 x 512) with LoRA rank 8, 32 steps", "consumer-calib32-lora8",
           "consumer-calib64-lora8", 64),
          ("LoRA 64 steps instead of 32 with 64 x 512 calibration", "consumer-calib64-lora8",
           "consumer-calib64-lora8-64steps", 64),
          ("LoRA rank 8, 64 steps", "consumer-calib32", "consumer-calib32-lora8-64steps", VALID_CALIB),
          ("the 64 LoRA steps between 2 shots (32 after each) instead of after 1 shot",
           "consumer-calib32-lora8-64steps", "consumer-calib32-2shots-lora8-32steps", VALID_CALIB),
          ("the 64 LoRA steps between 4 shots (16 after each) instead of after 1 shot",
           "consumer-calib32-lora8-64steps", "consumer-calib32-4shots-lora8-16steps", VALID_CALIB),
          ("the same LoRA on the dense model (adaptation alone)", "dense", "dense-lora8", VALID_CALIB),
          ("10% of head parameters forced out", "consumer-calib32", "consumer-calib32-heads0.1", VALID_CALIB),
          ("20% of head parameters forced out (uniform)", "consumer-calib32", "consumer-calib32-heads0.2", VALID_CALIB),
          ("residual stream sliced to 544 of 576 first (equal non-embedding size)", "consumer-calib32",
           "consumer-calib32-residual544", VALID_CALIB)]


def lever_summary(rows: list[dict]) -> list[str]:
    """What each lever bought at target 0.8 on validation text: the change of perplexity against its baseline
    measured on the same windows (levers with a missing row are left out)."""
    valid = {(r["name"], r.get("valid_avoid", VALID_CALIB)): r for r in rows
             if r.get("split") == "valid" and r["target"] in (0.8, 1.0)}
    out = []
    for lever, base, variant, avoid in LEVERS:
        if (base, avoid) in valid and (variant, avoid) in valid:
            a, b = valid[(base, avoid)]["ppl"], valid[(variant, avoid)]["ppl"]
            out.append(f"| {lever} | {base} {a:.2f} | {variant} {b:.2f} | {b / a - 1:+.1%} | "
                       f"{split_label(valid[(variant, avoid)])} |")
    if not out:
        return []
    return ["", "**What each lever bought** (target 0.8 unless dense; validation windows; 1 shot, consumer update, "
            "32 x 512 calibration unless the lever changes it):", "",
            "| lever | baseline PPL | with the lever | change | eval |", "|---|---|---|---|---|"] + out + [
            "", "Not measured: the paper's 128 x 2048 calibration (16x the tokens of "
            "32 x 512; the 64 x 512 dense curvature alone took 486 s on one core here)."]


def split_label(row: dict) -> str:
    """`test`, `valid` (windows avoiding the 32 x 512 calibration windows) or `valid⊥N` (avoiding N of them)."""
    avoid = row.get("valid_avoid", VALID_CALIB)
    return row.get("split", "test") + (f"⊥{avoid}" if row.get("split") == "valid" and avoid != VALID_CALIB else "")


def chosen_on_validation(rows: list[dict]) -> list[str]:
    """Per target and set of validation windows, the variant with the lowest perplexity (`--split valid` rows;
    rows on windows avoiding more calibration windows, `valid⊥N`, compare only among themselves)."""
    out = []
    pruned = [r for r in rows if r.get("split") == "valid" and r["target"] < 1]
    for avoid, target in sorted({(r.get("valid_avoid", VALID_CALIB), r["target"]) for r in pruned},
                                key=lambda k: (k[0], -k[1])):
        valid = sorted((r for r in pruned if r["target"] == target and r.get("valid_avoid", VALID_CALIB) == avoid),
                       key=lambda r: r["ppl"])
        ranked = ", ".join(f"{r['name']} {r['ppl']:.2f}" for r in valid)
        out += ["", f"**Chosen on validation text ({split_label(valid[0])}), target {target:g}: {valid[0]['name']}** "
                f"(PPL on the {valid[0]['evaluation'].split(' x ')[0].replace('first ', '')} validation windows, "
                f"best first: {ranked})."]
    rows = [r for r in rows if r.get("valid_avoid", VALID_CALIB) == VALID_CALIB]
    references = [r for r in rows if r.get("split") == "valid" and r["target"] >= 1]
    if references:
        out += ["", "Unpruned references on the same validation windows: "
                + ", ".join(f"{r['name']} {r['ppl']:.2f}" for r in references) + ".  Low-rank corrections train "
                "on the calibration windows, and the validation windows, though they share no token with them, "
                "come from the same articles: what the same corrections do to the dense model measures how much "
                "of their gain is adaptation to that text rather than repair of the pruning.  Test numbers of "
                "the chosen settings: `prune_matrix_32x512_full*.md`."]
    return out


def parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=DEFAULT_TARGET)
    ap.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS, help="first k windows; 0 = all")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS))
    ap.add_argument("--split", choices=("test", "valid"), default="test")
    ap.add_argument("--valid-avoid", type=int, default=VALID_CALIB,
                    help="validation windows avoid the first N calibration windows of 512 tokens (the first 32 are "
                         "those of every 32-window variant: the sets grow by appending)")
    ap.add_argument("--table", action="store_true")
    return ap


def main() -> None:
    args = parser().parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    avoid = args.valid_avoid
    names = args.only or [n for n in VARIANTS if args.split == "test" or VARIANTS[n][1] == avoid]
    if args.split == "valid" and any(VARIANTS[n][1] > avoid for n in names):
        raise SystemExit(f"--split valid --valid-avoid {avoid} runs only variants of at most {avoid} x 512 "
                         f"calibration windows (its windows avoid those)")
    todo = [n for n in names if not record_path(n, args.target, args.split, avoid).exists()]
    if todo and not args.table:
        model, tokenizer = load_smollm2()
        if args.split == "valid":
            evals = validation_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2/valid.txt")), 2048,
                                       avoid, 512, seed=0, limit=args.eval_windows or None)
        else:
            evals = eval_windows(tokenize(tokenizer, read_text(DATA / "wikitext-2-raw/wiki.test.raw")), 2048,
                                 limit=args.eval_windows or None)
        graph = build_graph(model, (evals[:1, :64],))
        groups = prunable_groups(graph, 1)
        for name in todo:
            record = run_variant(name, model, tokenizer, graph, groups, evals, args.target, args.split, avoid)
            record_path(name, args.target, args.split, avoid).write_text(json.dumps(record, indent=1))
            print(f"{name}: PPL {record['ppl']:.2f} ({record['prune_s']:.0f} s)", flush=True)
    write_table()


if __name__ == "__main__":
    main()
