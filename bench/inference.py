"""Inference speed of structured-pruned SmolLM2-135M against the dense model, on CPU (and CUDA when present).

    python bench/inference.py [--threads 1] [--repeats 5] [--device cpu] [--quick] [--out docs/results]

The structured models are made by removing units uniformly (speed does not depend on which units go): one query
head per KV head in every layer (9 → 6 heads, 3 KV heads kept) and, in every MLP, as many neurons as bring the
prunable parameters (q, k, v, o, gate, up, down of every layer) to the kept fraction (80% and 70%).  Each is
also built with the kept neurons rounded to a multiple of 8 and of 64 (nearest multiple: the budget moves by at
most 32 neurons per layer, and each variant is compared with its own ideal).  Every case is timed on all models
interleaved (rotating order, medians of the repeats) in one process; see `surgeon_fx/speed.py` for the
definitions of the ideal speed-up.  Writes `<out>/inference_<device>.json` and `.md`.
"""
from __future__ import annotations

import argparse
import ctypes
import copy
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon_fx import speed  # noqa: E402
from surgeon_fx.graph import build_graph  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402
from surgeon_fx.passes.rewrite import shrink  # noqa: E402
from surgeon_fx.passes.round_units import round_keep  # noqa: E402

PRUNABLE_KINDS = ("heads", "kv_heads", "neurons")


def git_commit() -> str:
    run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return run.stdout.strip() or "unknown"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def uniform_removal(graph, keep: float, multiple: int = 1) -> tuple[dict[str, list[int]], dict]:
    """Remove one query head per KV head everywhere and the MLP neurons that bring the layer to `keep`."""
    shapes = graph.param_shapes
    groups = [g for g in graph.groups if g.kind in PRUNABLE_KINDS]
    total = sum(sum(u.numel(shapes) for u in g.units) for g in groups if g.kind != "heads")
    removed, kept_params, widths = {}, 0, set()
    by_layer: dict[str, list] = {}
    for g in groups:
        by_layer.setdefault(g.name.split(".mlp")[0].split(".self_attn")[0], []).append(g)
    for layer, gs in by_layer.items():
        heads = next(g for g in gs if g.kind == "heads")
        kv = next(g for g in gs if g.kind == "kv_heads")
        mlp = next(g for g in gs if g.kind == "neurons")
        n_mlp = mlp.units[0].numel(shapes)
        attn = sum(u.numel(shapes) for u in kv.units)  # q, k, v, o of all heads
        layer_params = attn + n_mlp * mlp.size
        attn_kept = attn - heads.units[0].numel(shapes)  # one of the query heads of every KV head removed
        n_keep = round((keep * layer_params - attn_kept) / n_mlp)
        n_keep = round_keep(n_keep, multiple, mlp.size) if multiple > 1 else n_keep
        removed[heads.name] = [heads.size - 1]
        removed[mlp.name] = list(range(n_keep, mlp.size))
        kept_params += attn_kept + n_keep * n_mlp
        widths.add(n_keep)
    return removed, {"kept_fraction": kept_params / total, "intermediate": sorted(widths), "multiple": multiple}


def build_models(keeps, multiples):
    dense, _ = load_smollm2()
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    graph = build_graph(dense, (ids,))
    models, info = {"dense": dense}, {"dense": {"kept_fraction": 1.0, "intermediate": [1536], "multiple": 1}}
    for keep in keeps:
        for mult in multiples:
            removed, meta = uniform_removal(graph, keep, mult)
            name = f"keep{round(keep * 100)}" + (f"_r{mult}" if mult > 1 else "")
            model = copy.deepcopy(dense)
            shrink(model, graph, removed)
            models[name], info[name] = model, meta
    return models, info


def grid(quick: bool, clock: str):
    """(label, case, macs(model) -> dict, tokens per timed run, repeats scale)."""
    def f(b, s):
        return speed.forward_case(b, s, clock=clock)

    def p(b, s):
        return speed.prefill_case(b, s, clock=clock)

    def d(b, s, n):
        return speed.decode_case(b, s, n, clock=clock)

    cases = [
        ("forward b1 s128", f(1, 128), lambda m: speed.case_macs(m, 1, 128), 128, 1.0),
        ("forward b1 s512", f(1, 512), lambda m: speed.case_macs(m, 1, 512), 512, 1.0),
        ("forward b8 s128", f(8, 128), lambda m: speed.case_macs(m, 8, 128), 1024, 1.0),
        ("forward b1 s2048", f(1, 2048), lambda m: speed.case_macs(m, 1, 2048), 2048, 0.6),
        ("prefill b1 s512", p(1, 512), lambda m: speed.case_macs(m, 1, 512, all_logits=False), 512, 1.0),
        ("decode b1 p128 +32", d(1, 128, 32), lambda m: speed.decode_macs(m, 1, 128, 32), 32, 1.0),
        ("decode b8 p64 +32", d(8, 64, 32), lambda m: speed.decode_macs(m, 8, 64, 32), 256, 1.0),
    ]
    if quick:
        keep = {"forward b1 s128", "prefill b1 s512", "decode b1 p128 +32"}
        cases = [c for c in cases if c[0] in keep]
    return cases


def alignment_gemms(widths=(1248, 1250, 1252, 1254, 1256, 1280), tokens: int = 512, hidden: int = 576,
                    repeats: int = 9) -> list[dict]:
    """GFLOP/s of the MLP's two GEMM shapes at MLP width n: up/gate (n outputs) and down (n inputs), CPU clock."""
    import statistics
    import time

    f = torch.nn.functional.linear
    x = torch.randn(tokens, hidden)
    rows = []
    for n in widths:
        w_up, w_down, h = torch.randn(n, hidden), torch.randn(hidden, n), torch.randn(tokens, n)
        row = {"width": n, "width_mod_8": n % 8}
        for label, fn in (("up", lambda: f(x, w_up)), ("down", lambda: f(h, w_down))):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.process_time()
                fn()
                ts.append(time.process_time() - t0)
            row[f"{label}_gflops"] = 2 * tokens * hidden * n / statistics.median(ts) / 1e9
        rows.append(row)
    return rows


def profile_ops(model, case, top: int = 12) -> list[dict]:
    """Self CPU time per ATen op for one run of `case` (torch.profiler), the `top` largest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        case(model)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count} for e in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see the report)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=("cpu", "wall"), help="default: cpu on CPU (see speed.py), wall on CUDA")
    ap.add_argument("--quick", action="store_true", help="three small cases, for a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results")
    ap.add_argument("--render", type=Path, help="only rewrite the .md beside this .json from its contents")
    args = ap.parse_args()
    if args.render:
        args.render.with_suffix(".md").write_text(to_markdown(json.loads(args.render.read_text())))
        return
    torch.set_num_threads(args.threads)
    clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    try:  # a fixed mmap threshold: freed activations go back to the OS, so peak RSS per run is measurable
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)
    except OSError:
        pass
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": cpu_name(), "threads": args.threads, "clock": clock, "device": args.device, "repeats": args.repeats,
            "load_average_start": speed.load_average()}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    models, info = build_models((0.8, 0.7), (1, 8, 64))
    for m in models.values():
        m.to(args.device)
    results = []
    for label, case, macs, tokens, scale in grid(args.quick, clock):
        t = speed.interleaved(models, case, repeats=max(3, round(args.repeats * scale)))
        dense_macs = macs(models["dense"])
        rows = {}
        for name, model in models.items():
            ideal = speed.ideal_speedup(dense_macs, macs(model))
            s = t.speedup(name, "dense")
            rows[name] = {"median_s": t.median(name), "seconds": [round(x, 5) for x in t.seconds[name]],
                          "tokens_per_s": tokens / t.median(name), "speedup": s,
                          "ideal_linear": ideal["linear"], "ideal_matmul": ideal["matmul"],
                          "efficiency_linear": s / ideal["linear"], "efficiency_matmul": s / ideal["matmul"]}
        results.append({"case": label, "tokens": tokens, "models": rows})
        print(label, {n: (round(r["speedup"], 3), round(r["ideal_linear"], 3)) for n, r in rows.items()}, flush=True)
    memory = {}
    for label in ("forward b1 s512", "prefill b1 s512", "forward b8 s128"):
        case = dict((c[0], c[1]) for c in grid(False, clock))[label]
        memory[label] = {}
        for name, model in models.items():
            pm = speed.peak_memory(model, case)
            memory[label][name] = {"peak_bytes": pm.peak, "run_bytes": pm.peak - pm.before, "kind": pm.kind,
                                   "param_bytes": speed.param_bytes(model)}
    gemms = alignment_gemms() if args.device == "cpu" else []
    prof_case = speed.forward_case(1, 512, clock=clock)
    profile = {n: profile_ops(models[n], prof_case) for n in ("dense", "keep70", "keep70_r64")}
    meta["load_average_end"] = speed.load_average()
    report = {"meta": meta, "models": info, "results": results, "memory": memory, "profile_b1_s512": profile,
              "alignment_gemms": gemms}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"inference_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(to_markdown(report))
    print(f"wrote {stem}.json and .md")


NOTES = """\
Models: SmolLM2-135M (30 layers, hidden 576, 9 query heads of 64 over 3 KV heads, MLP 1536, tied 49152-token
lm_head) and uniformly width-pruned copies made with `passes.rewrite.shrink`: one query head per KV head removed
in every layer (6 heads, 3 KV heads) and the MLP cut so that the prunable parameters (q, k, v, o, gate, up, down)
keep 80% or 70%; `_r8` / `_r64`: the MLP width rounded to the nearest multiple of 8 / 64.

Ideal speed-up = dense MACs / pruned MACs of the same case: *linear* counts every `nn.Linear`, with the unpruned
lm_head on the positions whose logits are computed (all for "forward", the last one for "prefill" and each decode
step); *matmul* adds QKᵀ and AV of causal attention.  Efficiency = measured speed-up / ideal (goal ≥ 0.9).
Cases: "forward bB sS": one forward, logits for every position, no cache; "prefill": the prompt into a KV
cache, last logits only; "decode bB pP +N": N single-token steps with the KV cache after an untimed P-token
prefill (tokens/s = B·N / time).  CPU clock: CPU time of the process with one intra-op thread (the box is shared;
see `surgeon_fx/speed.py`).  Peak memory on CPU: the kernel's peak RSS (reset before each run), whole process
(all models loaded), and what the run added to it.

GPU numbers: `bench/gpu_speed.py` (2:4 semi-structured GEMMs and a 2:4 Llama-7B-shaped model end to end,
width-pruned 7B shapes vs ideal with and without rounding, structured LLM Surgeon throughput); the H200 results
are in `docs/results/gpu_speed_h200.md`."""


def to_markdown(r: dict) -> str:
    m = r["meta"]
    lines = [f"# Inference speed, {m['device']} (generated by bench/inference.py)", "", NOTES, "",
             f"{m['date']}, commit {m['git_commit'][:10]}, torch {m['torch']}, {m['cpu']}, {m['threads']} thread(s), "
             f"{m['clock']} clock, "
             f"load average {m['load_average_start']} at start, {m['load_average_end']} at end.", "",
             "| model | kept fraction of prunable params | MLP width |", "|---|---|---|"]
    for name, i in r["models"].items():
        lines.append(f"| {name} | {i['kept_fraction']:.3f} | {', '.join(map(str, i['intermediate']))} |")
    lines += ["", "Speed-up = dense median / pruned median (same process, interleaved); ideal = dense / pruned "
              "MACs (linear incl. lm_head; matmul adds QKᵀ and AV); efficiency = speed-up / ideal.", "",
              "| case | model | median s | tokens/s | speed-up | ideal (linear) | eff. (linear) | ideal (matmul) "
              "| eff. (matmul) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in r["results"]:
        for name, x in c["models"].items():
            lines.append(f"| {c['case']} | {name} | {x['median_s']:.4f} | {x['tokens_per_s']:.1f} | "
                         f"{x['speedup']:.3f} | {x['ideal_linear']:.3f} | {x['efficiency_linear']:.3f} | "
                         f"{x['ideal_matmul']:.3f} | {x['efficiency_matmul']:.3f} |")
    lines += ["", "| case | model | parameters MiB | peak RSS MiB | added by the run MiB |", "|---|---|---|---|---|"]
    for label, rows in r["memory"].items():
        if label == "note":
            continue
        for name, x in rows.items():
            lines.append(f"| {label} | {name} | {x['param_bytes'] / 2**20:.1f} | {x['peak_bytes'] / 2**20:.1f} | "
                         f"{x['run_bytes'] / 2**20:.1f} |")
    if r["memory"].get("note"):
        lines += ["", r["memory"]["note"]]
    if r.get("alignment_gemms"):
        lines += ["", "MLP GEMMs alone at MLP width n (512 tokens, hidden 576, GFLOP/s, CPU clock):", "",
                  "| n | n mod 8 | up/gate (n outputs) | down (n inputs) |", "|---|---|---|---|"]
        lines += [f"| {g['width']} | {g['width_mod_8']} | {g['up_gflops']:.1f} | {g['down_gflops']:.1f} |"
                  for g in r["alignment_gemms"]]
    lines += ["", "Top ops by self CPU time, forward b1 s512 (one run, torch.profiler):", ""]
    for name, rows in r["profile_b1_s512"].items():
        lines.append(f"- {name}: " + "; ".join(f"{x['op']} {x['self_ms']} ms ×{x['calls']}" for x in rows[:8]))
    if r.get("findings"):
        lines += ["", "## Findings (written from this run)", ""] + [f"- {f}" for f in r["findings"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
