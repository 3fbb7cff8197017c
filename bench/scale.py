"""Scale benchmark: structured LLM Surgeon, one shot to 80% of the prunable parameters, on Llama-shaped models
built from configs with RANDOM weights (speed and memory do not depend on weight values), stage by stage.

    python bench/scale.py CASE [CASE ...] [--device cuda] [--factor-memory GIB] [--budget S] [--out DIR]
    python bench/scale.py --report FILE.json [FILE.json ...]      # → docs/results/scale.md + scale.png

CASE is SHAPE:LAYERS:WINDOWSxLENGTH[:offload], e.g. `7b:32:128x2048` or `13b:40:2x2048:offload`; SHAPE is
one of `SHAPES` (7b: Llama-2-7B widths with 8 KV heads; 13b: Llama-2-13B; 1b: TinyLlama-1.1B widths; tiny).
`offload` keeps the weights in CPU memory and runs each module on the device only while it computes
(`passes.offload`, accelerate hooks).  Stages, each timed (CUDA-synchronised) with its own peak memory (GPU:
`max_memory_allocated` reset per stage; CPU: VmHWM reset per stage through /proc/self/clear_refs):

    build    the model from its config (bf16 on a GPU, fp32 on the CPU)
    graph    trace + dependency graph (`build_graph`), exact groups (`compile.prunable_groups`)
    collect  KFAC factors of every pruned layer (`collect_kfac`), kept in CPU memory (`FactorStore`),
             accumulators bounded by --factor-memory (more passes over the data when they do not fit)
    shot     the streaming structured shot (`passes.surgeon.prune`, 1 shot, target 0.8, consumer update)
    rewrite  the physically smaller model (`passes.rewrite.shrink`)

Cases run in the order given and are written to OUT/scale.json after each one; a case whose predicted time
(from the earlier cases of the same shape) exceeds what is left of --budget is recorded as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon_fx.compile import peak_rss_mb, prunable_groups, release_free_memory, reset_peak_rss  # noqa: E402
from surgeon_fx.graph import build_graph  # noqa: E402
from surgeon_fx.passes.curvature import collect_kfac  # noqa: E402
from surgeon_fx.passes.factor_store import FactorStore  # noqa: E402
from surgeon_fx.passes.offload import offloaded  # noqa: E402
from surgeon_fx.passes.rewrite import shrink  # noqa: E402
from surgeon_fx.passes.surgeon import SurgeonConfig, prune, pruned_layers  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
               vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256),
}
STAGES = ("build", "graph", "collect", "shot", "rewrite")


def parse_case(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in SHAPES or (len(parts) == 4 and parts[3] != "offload"):
        raise SystemExit(f"bad case {text!r}: want SHAPE:LAYERS:WINDOWSxLENGTH[:offload], SHAPE in {list(SHAPES)}")
    windows, length = (int(x) for x in parts[2].split("x"))
    return {"case": text, "shape": parts[0], "layers": int(parts[1]), "windows": windows, "length": length,
            "offload": len(parts) == 4}


@contextmanager
def stage(row: dict, name: str, device: torch.device):
    """Time a stage and record its own peak GPU memory and peak resident memory (GiB)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    release_free_memory()
    reset_peak_rss()
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    row["stages"][name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib": peak_rss_mb() / 1024,
                           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    print(f"  {name:8s} {row['stages'][name]}", flush=True)


def build(shape: str, layers: int, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=4096, use_cache=False,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def run_case(case: dict, device: torch.device, factor_memory: float | None) -> dict:
    row = {**case, "stages": {}}
    home = torch.device("cpu") if case["offload"] else device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    row["dtype"] = str(dtype).removeprefix("torch.")
    with stage(row, "build", device):
        model = build(case["shape"], case["layers"], home, dtype)
    row["parameters_before"] = sum(p.numel() for p in model.parameters())
    with stage(row, "graph", device):
        graph = build_graph(model, (torch.randint(0, 100, (1, 16), device=home),))
        groups = prunable_groups(graph, 1)
    layers = pruned_layers(model, groups)
    calib = torch.randint(0, SHAPES[case["shape"]]["vocab_size"], (case["windows"], case["length"]),
                          generator=torch.Generator().manual_seed(0))
    budget = None if factor_memory is None else int(factor_memory * 2**30)
    with stage(row, "collect", device):
        with offloaded(model, device) if case["offload"] else nullcontext():
            factors = collect_kfac(model, calib, layers, device=device, store=FactorStore(), max_factor_bytes=budget,
                                   progress=False)
    row["factor_gib"] = factors.stored_bytes() / 2**30  # packed lower triangles, float32
    with stage(row, "shot", device):
        result = prune(model, calib, groups, SurgeonConfig(structure="structured", target=0.8, shots=1),
                       collect_curvature=lambda m, w: factors, device=device)
    factors = None  # the stored factors are freed before the rewrite
    row["achieved"] = result.logs[-1].achieved
    with stage(row, "rewrite", device):
        shrink(model, graph, result.removed)
    row["parameters_after"] = sum(p.numel() for p in model.parameters())
    row["total_s"] = round(sum(s["seconds"] for s in row["stages"].values()), 2)
    return row


def predicted(case: dict, done: list[dict]) -> float | None:
    """Seconds for `case` from the last finished case of its shape: collection ∝ layers × tokens, the rest ∝
    layers (None when there is none)."""
    same = [r for r in done if r.get("shape") == case["shape"] and "total_s" in r and r["offload"] == case["offload"]]
    if not same:
        return None
    r = same[-1]
    tokens, r_tokens = case["windows"] * case["length"], r["windows"] * r["length"]
    collect = r["stages"]["collect"]["seconds"] * case["layers"] / r["layers"] * tokens / r_tokens
    rest = (r["total_s"] - r["stages"]["collect"]["seconds"]) * case["layers"] / r["layers"]
    return collect + rest


def meta(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else
            platform.processor() or platform.machine(), "cpus": os.cpu_count(), "commit": commit,
            "weights": "random (from config)", "target": 0.8, "shots": 1}


def main_run(args) -> None:
    device = torch.device(args.device)
    cases = [parse_case(c) for c in args.cases]
    end = time.monotonic() + args.budget
    out = {"meta": {**meta(device), "factor_memory_gib": args.factor_memory}, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / args.name
    for case in cases:
        need, left = predicted(case, out["rows"]), end - time.monotonic()
        print(f"{case['case']}: predicted {need and round(need)} s, {left:.0f} s left", flush=True)
        if (need if need is not None else 60.0) > left:
            out["rows"].append({**case, "skipped": f"needs ≈ {need or 60:.0f} s, {left:.0f} s left"})
        else:
            try:
                out["rows"].append(run_case(case, device, args.factor_memory))
            except Exception as err:  # noqa: BLE001 - one prepared run returns what it can
                out["rows"].append({**case, "error": f"{type(err).__name__}: {err}"[:500],
                                    "trace": traceback.format_exc()[-1500:]})
                print(out["rows"][-1]["trace"], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


# -- report --------------------------------------------------------------------------------------------------
def _peak(row: dict, key: str) -> float | None:
    values = [s[key] for s in row["stages"].values() if s.get(key) is not None]
    return max(values) if values else None


def report(files: list[Path], md: Path) -> None:
    """Markdown table per input file and one plot: collection time vs layers × tokens, shot time and peak memory
    vs layers, every finished case a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(f.read_text()) for f in files]
    lines = []
    for f, run in zip(files, runs):
        m = run["meta"]
        bound = (f"bounded to {m['factor_memory_gib']} GiB" if m["factor_memory_gib"] is not None
                 else "not bounded (every layer at once)")
        lines += [f"### {f.name}: {m['device']} ({m['cpus']} CPUs), torch {m['torch']}, commit {m['commit']}, "
                  f"{m['date']}", "",
                  f"Weights: **{m['weights']}**; structured, target {m['target']}, {m['shots']} shot; factor "
                  f"accumulators {bound}.", "",
                  "| case | dtype | params | kept | " + " | ".join(f"{s} s" for s in STAGES)
                  + " | total s | peak GPU GiB | peak RSS GiB | factors GiB |",
                  "|---" * (len(STAGES) + 8) + "|"]
        for r in run["rows"]:
            if "total_s" not in r:
                lines.append(f"| {r['case']} | {r.get('skipped') or r.get('error')} |")
                continue
            gpu, rss = _peak(r, "peak_gpu_gib"), _peak(r, "peak_rss_gib")
            lines.append(f"| {r['case']} | {r['dtype']} | {r['parameters_before'] / 1e9:.2f} B → "
                         f"{r['parameters_after'] / 1e9:.2f} B | {r['achieved']:.3f} | "
                         + " | ".join(f"{r['stages'][s]['seconds']:.1f}" for s in STAGES)
                         + f" | {r['total_s']:.0f} | {'–' if gpu is None else f'{gpu:.1f}'} | "
                           f"{'–' if rss is None else f'{rss:.1f}'} | {r['factor_gib']:.1f} |")
        lines.append("")
    md.write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    panels = (("collect", lambda r: r["layers"] * r["windows"] * r["length"], "decoder layers × calibration tokens",
               "collect seconds"),
              ("shot", lambda r: r["layers"], "decoder layers", "shot seconds"),
              ("memory", lambda r: r["layers"], "decoder layers", "peak GiB (GPU, else resident)"))
    for f, run in zip(files, runs):
        rows = [r for r in run["rows"] if "total_s" in r]
        device = run["meta"]["device"]
        for ax, (what, x_of, xlabel, ylabel) in zip(axes, panels):
            for r in rows:
                mem = _peak(r, "peak_gpu_gib") if r["stages"]["shot"]["peak_gpu_gib"] is not None else \
                    _peak(r, "peak_rss_gib")
                y = mem if what == "memory" else r["stages"][what]["seconds"]
                ax.scatter(x_of(r), y, marker="s" if r["offload"] else "o",
                           color="tab:green" if "H200" in device else "tab:blue")
                ax.annotate(r["case"], (x_of(r), y), fontsize=7, xytext=(4, 2), textcoords="offset points")
            ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log" if what == "collect" else "linear", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Structured LLM Surgeon, 1 shot to 0.8, random-weight Llama shapes "
                 "(green: H200, blue: CPU; squares: offloaded model)")
    fig.tight_layout()
    fig.savefig(md.with_suffix(".png"), dpi=110)
    print(f"wrote {md.with_suffix('.png')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--factor-memory", type=float, default=None, help="GiB of factor accumulators alive at once")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; later cases predicted to overrun are skipped")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "docs/results")))
    ap.add_argument("--name", default="scale.json")
    ap.add_argument("--report", type=Path, nargs="+", help="JSON files to turn into --md and its .png")
    ap.add_argument("--md", type=Path, default=ROOT / "docs/results/scale_tables.md")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.md)
    else:
        main_run(args)


if __name__ == "__main__":
    main()
