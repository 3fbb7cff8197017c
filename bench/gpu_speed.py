"""One prepared GPU session (≈ 8 minutes on an H100/H200): what 2:4 sparsity and width pruning buy on a GPU.

    python bench/gpu_speed.py [--out DIR] [--budget 420] [--smoke]

Sections, each timed with CUDA events (median of repeats, dense and sparse interleaved) and each guarded so a
failure is recorded and the next one still runs; a section that would start after the time budget is skipped:

1. gemm:        fp16 linear y = x Wᵀ, dense vs 2:4 semi-structured (`passes.semistructured`), for W of
                4096×4096, 11008×4096 and 4096×11008 and 2048 / 128 / 16 tokens.
2. end_to_end:  a Llama-2-7B-shaped model built from its config (random weights, fp16, 2:4-masked decoder
                linears), dense-masked vs converted: outputs compared, prefill (1×2048, 8×512) and decode
                (batch 1 and 16, 32 steps after a 512-token prompt) timed.
3. structured:  the same shapes width-pruned uniformly (one query head in 4 and MLP neurons: 80% and 70% of the
                decoder parameters kept), MLP widths unaligned, rounded to 8 and to 64 — built from configs, the
                shapes `passes.rewrite.shrink` emits — speed-up against the ideal (`surgeon_fx.speed`).
4. surgeon:     structured LLM Surgeon (`passes.surgeon.prune`, 1 shot, KFAC) on Llama-shaped models of growing
                depth until memory or time runs out: seconds per shot, per layer and calibration tokens/s.

Writes DIR/gpu_speed.json (DIR: $OUT if set, else docs/results).  `--smoke` runs every section with tiny shapes
on whatever device there is (on CPU the 2:4 parts record `SemiStructuredUnavailable`): a check of the script.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon_fx import speed  # noqa: E402
from surgeon_fx.passes.nm import nm_mask  # noqa: E402
from surgeon_fx.passes.semistructured import SemiStructuredUnavailable, relative_error, to_semi_structured  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=32, vocab_size=32000)
SMOKE = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=4,
             num_hidden_layers=2, vocab_size=512)
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def timed(fn, device, repeats: int = 10, warmup: int = 3) -> list[float]:
    """Seconds per call of fn: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def pair(dense_fn, other_fn, device, rounds: int = 3, repeats: int = 5, other: str = "sparse") -> dict:
    """Dense and the other model timed in alternating rounds; medians and the speed-up."""
    d, s = [], []
    for _ in range(rounds):
        d += timed(dense_fn, device, repeats)
        s += timed(other_fn, device, repeats)
    md, ms = statistics.median(d), statistics.median(s)
    return {"dense_s": md, f"{other}_s": ms, "speedup": md / ms}


@torch.no_grad()
def mask_linear(lin: nn.Linear) -> None:
    """Keep the 2 largest |w| of every 4 inputs."""
    lin.weight.mul_(nm_mask(lin.weight.abs().float(), 2, 4).to(lin.weight.dtype))


def mask_24(model: nn.Module) -> None:
    """2:4-mask every decoder linear (the lm_head stays dense)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in DECODER_LINEARS:
            mask_linear(mod)


def llama(shape: dict, device, dtype, **over) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, max_position_embeddings=4096, use_cache=False)
    for k, v in over.items():  # set after construction: pruned head counts need not divide hidden_size
        setattr(cfg, k, v)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


# -- sections ----------------------------------------------------------------------------------------------
@torch.no_grad()
def section_gemm(device, smoke: bool) -> list[dict]:
    shapes = [(256, 128), (128, 256)] if smoke else [(4096, 4096), (11008, 4096), (4096, 11008)]
    tokens = [64, 16] if smoke else [2048, 128, 16]
    rows = []
    for out_f, in_f in shapes:
        lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.float16)
        mask_linear(lin)
        kinds = ("cusparselt", "cutlass") if torch.cuda.get_device_capability()[0] == 8 else ("cusparselt",)
        for kind in kinds:  # PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only
            holder = nn.Sequential(copy.deepcopy(lin))
            to_semi_structured(holder, torch.float16, device, kind)
            sparse = holder[0]
            for n in tokens:
                x = torch.randn(n, in_f, device=device, dtype=torch.float16)
                err = float((sparse(x) - lin(x)).abs().max() / lin(x).abs().max())
                rows.append({"weight": [out_f, in_f], "tokens": n, "backend": kind, "rel_err": err,
                             **pair(lambda: lin(x), lambda: sparse(x), device)})
    return rows


def _gen(model, ids_prompt, steps):
    out = model(input_ids=ids_prompt, use_cache=True, logits_to_keep=1)
    cache, tok = speed.kv_cache(out), out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        cache = speed.kv_cache(model(input_ids=tok, use_cache=True, **speed.cache_kwarg(model, cache)))


@torch.no_grad()
def section_end_to_end(device, smoke: bool) -> dict:
    shape = SMOKE if smoke else LLAMA_7B
    dense = llama(shape, device, torch.float16)
    mask_24(dense)
    sparse = copy.deepcopy(dense)
    report = to_semi_structured(sparse, torch.float16, device)
    v = shape["vocab_size"]
    ids = torch.randint(0, v, (1, 128), device=device)
    out = {"converted": len(report.converted), "skipped": report.skipped, "backend": report.backend,
           "rel_err_logits": relative_error(sparse, dense, (ids,))}
    cases = [(1, 256), (2, 64)] if smoke else [(1, 2048), (8, 512)]
    for b, s in cases:
        x = torch.randint(0, v, (b, s), device=device)
        out[f"prefill b{b} s{s}"] = pair(lambda: dense(input_ids=x, logits_to_keep=1),
                                         lambda: sparse(input_ids=x, logits_to_keep=1), device, repeats=3)
    for b in (1, 16):
        p = torch.randint(0, v, (b, 64 if smoke else 512), device=device)
        steps = 4 if smoke else 32
        r = pair(lambda: _gen(dense, p, steps), lambda: _gen(sparse, p, steps), device, rounds=2, repeats=2)
        out[f"generate b{b} +{steps} (incl. prefill)"] = r
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return out


def structured_shapes(shape: dict, keep: float, multiple: int) -> dict:
    """Uniform width pruning to `keep` of the decoder parameters: 1 query head in 4 (of every KV head's share),
    the MLP neurons that meet the budget, rounded to `multiple` (the shapes `shrink` would emit)."""
    from surgeon_fx.passes.round_units import round_keep

    h, kv, d, f = (shape[k] for k in ("num_attention_heads", "num_key_value_heads", "hidden_size",
                                      "intermediate_size"))
    hd = d // h
    heads = h - h // 4 if kv == h else h - kv * max(1, (h // kv) // 4)
    kv_new = heads if kv == h else kv
    layer = 2 * d * h * hd + 2 * d * kv * hd + 3 * d * f
    attn = 2 * d * heads * hd + 2 * d * kv_new * hd
    inter = round((keep * layer - attn) / (3 * d))
    inter = round_keep(inter, multiple, f) if multiple > 1 else inter
    return {**shape, "num_attention_heads": heads, "num_key_value_heads": kv_new, "head_dim": hd,
            "intermediate_size": inter}


@torch.no_grad()
def section_structured(device, smoke: bool) -> list[dict]:
    shape = {**(SMOKE if smoke else LLAMA_7B), "num_hidden_layers": 2 if smoke else 8}
    dense = llama(shape, device, torch.float16)
    cases = [(1, 128), (1, 16)] if smoke else [(1, 2048), (8, 512)]
    rows = []
    for keep in (0.8, 0.7):
        for mult in (1, 8, 64):
            cfg = structured_shapes(shape, keep, mult)
            small = llama(shape, device, torch.float16, **{k: v for k, v in cfg.items() if k not in shape or
                                                           cfg[k] != shape[k]})
            for b, s in cases:
                x = torch.randint(0, shape["vocab_size"], (b, s), device=device)
                r = pair(lambda: dense(input_ids=x), lambda: small(input_ids=x), device, repeats=3, other="pruned")
                ideal = speed.ideal_speedup(speed.case_macs(dense, b, s), speed.case_macs(small, b, s))
                rows.append({"keep": keep, "multiple": mult, "intermediate": cfg["intermediate_size"],
                             "heads": cfg["num_attention_heads"], "case": f"forward b{b} s{s}", **r,
                             "ideal_linear": ideal["linear"], "ideal_matmul": ideal["matmul"],
                             "efficiency_linear": r["speedup"] / ideal["linear"]})
            small = None  # free the pruned model before the next shape
    return rows


def section_surgeon(device, smoke: bool, deadline: Deadline) -> list[dict]:
    from surgeon_fx.passes.curvature import collect_kfac
    from surgeon_fx.passes.surgeon import SurgeonConfig, prune, pruned_layers
    from surgeon_fx.graph import build_graph

    shape = SMOKE if smoke else {**LLAMA_7B, "num_key_value_heads": 8}
    depths = [1, 2] if smoke else [2, 4, 8, 16, 32]
    windows, length = (4, 32) if smoke else (32, 512)
    rows, per_layer = [], None
    for depth in depths:
        need = 60.0 if per_layer is None else per_layer * depth * 1.3
        if need > deadline.left():
            rows.append({"layers": depth, "skipped": f"needs ≈ {need:.0f} s, {deadline.left():.0f} s left"})
            break
        try:
            model = llama({**shape, "num_hidden_layers": depth}, device, torch.float32)
            t0 = time.perf_counter()
            graph = build_graph(model, (torch.randint(0, 100, (1, 16), device=device),))
            t_graph = time.perf_counter() - t0
            calib = torch.randint(0, shape["vocab_size"], (windows, length), device=device)
            t0 = time.perf_counter()
            layers = pruned_layers(model, graph.groups)
            result = prune(model, calib, graph.groups, SurgeonConfig(structure="structured", target=0.8, shots=1),
                           collect_curvature=lambda m, w: collect_kfac(m, w, layers, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter() - t0
            per_layer = t / depth
            rows.append({"layers": depth, "graph_s": t_graph, "shot_s": t, "s_per_layer": per_layer,
                         "calib_tokens_per_s": windows * length / t, "achieved": result.logs[-1].achieved,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
        except torch.OutOfMemoryError as err:
            rows.append({"layers": depth, "error": f"out of memory: {err}"[:300]})
            break
        finally:
            model = graph = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "docs/results")))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped after it")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sections", default="gemm,end_to_end,structured,surgeon", help="comma-separated subset")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deadline = Deadline(args.budget)
    res = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                    "capability": list(torch.cuda.get_device_capability()) if device.type == "cuda" else None,
                    "smoke": args.smoke}}
    sections = [("gemm", lambda: section_gemm(device, args.smoke)),
                ("end_to_end", lambda: section_end_to_end(device, args.smoke)),
                ("structured", lambda: section_structured(device, args.smoke)),
                ("surgeon", lambda: section_surgeon(device, args.smoke, deadline))]
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.sections.split(","))
    for name, fn in [s for s in sections if s[0] in wanted]:
        if deadline.left() <= 0:
            res[name] = {"skipped": "time budget spent"}
            (args.out / "gpu_speed.json").write_text(json.dumps(res, indent=1, default=str))
            continue
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except SemiStructuredUnavailable as err:
            res[name] = {"unavailable": str(err)}
        except Exception as err:  # noqa: BLE001 - record and go on: one prepared run must return what it can
            res[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        res.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (args.out / "gpu_speed.json").write_text(json.dumps(res, indent=1, default=str))
        print(name, json.dumps(res[name], default=str)[:600], flush=True)
    print(f"wrote {args.out / 'gpu_speed.json'}")


if __name__ == "__main__":
    main()
