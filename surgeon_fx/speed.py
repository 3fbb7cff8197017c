"""How fast a (pruned) model runs: timed cases, interleaved repeats, peak memory and ideal FLOP ratios.

Measurement helpers for the benchmarks in bench/ (inference.py, gpu_speed.py); the pipeline does not use them.

A *case* is a function `f(model) -> seconds` that times only the part it measures (a decode case prefills
untimed first), by one of two clocks: "wall" (elapsed time; the one for CUDA) or "cpu" (CPU time of the
process: with one intra-op thread on a CPU shared with other jobs, the time our work took while it ran, which
other processes' load does not inflate; tokens/s by that clock are per dedicated core).  `interleaved` runs a
case on every model in rotating order, repeat after repeat, so that a drift in machine load (and in cache or
memory-bandwidth contention, which the CPU clock still sees) hits all models alike; ratios of medians from one
such run are the numbers to report.

Hugging Face causal LMs only for `prefill_case` and `decode_case` (they use the model's own KV cache: a pruned
Llama keeps working because its attention reshapes with -1 heads and the cache is filled from the key states).

Ideal speed-up (`ideal_speedup`): the ratio of multiply-accumulates done in matmuls, dense over pruned, for the
same case.  `linear_macs` counts every `nn.Linear` (in × out per token), the output head (lm_head, not pruned)
only on the positions whose logits are computed; `attention_macs` adds the two attention matmuls (QKᵀ and AV:
2 × heads·head_dim per query-key pair, causal).  Element-wise ops, norms and softmax are not counted.
"""
from __future__ import annotations

import gc
import inspect
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Case = Callable[[nn.Module], float]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_CLEAR_REFS = "/proc/self/clear_refs"


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def _tokens(model: nn.Module, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Fixed random token ids below min(vocab, 1000) on the model's device."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = min(1000, emb.num_embeddings) if isinstance(emb, nn.Embedding) else 1000
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=g).to(device_of(model))


def forward_case(batch: int, seq: int, call: Callable[[nn.Module, torch.Tensor], object] | None = None,
                 clock: str = "wall") -> Case:
    """Latency of one forward on [batch, seq] random token ids (logits for every position, no cache).

    `call(model, ids)` defaults to a HF causal LM call `model(input_ids=ids, use_cache=False)`.
    """
    call = call or (lambda m, ids: m(input_ids=ids, use_cache=False))
    now = CLOCKS[clock]

    @torch.inference_mode()
    def run(model: nn.Module) -> float:
        dev = device_of(model)
        ids = _tokens(model, batch, seq)
        sync(dev)
        t0 = now()
        call(model, ids)
        sync(dev)
        return now() - t0

    return run


def prefill_case(batch: int, seq: int, clock: str = "wall") -> Case:
    """Prefill as generation does it: the prompt into a fresh KV cache, logits for the last position only."""
    return forward_case(batch, seq, lambda m, ids: m(input_ids=ids, use_cache=True, logits_to_keep=1), clock)


def decode_case(batch: int, prompt: int, new_tokens: int, clock: str = "wall") -> Case:
    """Seconds for `new_tokens` single-token steps with the KV cache after an untimed `prompt`-token prefill.

    The fed tokens are fixed (not sampled) so that every model does the same work.
    """
    now = CLOCKS[clock]

    @torch.inference_mode()
    def run(model: nn.Module) -> float:
        dev = device_of(model)
        ids = _tokens(model, batch, prompt + new_tokens)
        cache = kv_cache(model(input_ids=ids[:, :prompt], use_cache=True, logits_to_keep=1))
        sync(dev)
        t0 = now()
        for i in range(prompt, prompt + new_tokens):
            cache = kv_cache(model(input_ids=ids[:, i:i + 1], use_cache=True, **cache_kwarg(model, cache)))
        sync(dev)
        return now() - t0

    return run


def kv_cache(output):
    """The KV cache of a HF output (`cache` in transformers ≥ 5.2x, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_kwarg(model: nn.Module, cache) -> dict:
    """{name: cache} under the keyword this model's forward takes (`cache` or `past_key_values`)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@dataclass
class Timings:
    """Seconds per repeat, per model name (after warm-up)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def speedup(self, name: str, reference: str) -> float:
        """Median-over-median speed-up of `name` over `reference` (>1: faster)."""
        return self.median(reference) / self.median(name)


def interleaved(models: dict[str, nn.Module], case: Case, repeats: int = 5, warmup: int = 1) -> Timings:
    """Time `case` on every model, `repeats` rounds, the model order rotated each round (load drift cancels)."""
    names = list(models)
    for _ in range(warmup):
        for n in names:
            case(models[n])
    out = Timings({n: [] for n in names})
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out.seconds[n].append(case(models[n]))
    return out


# -- memory ------------------------------------------------------------------------------------------------
def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Peak bytes while running a case: CUDA max_memory_allocated, or the process peak RSS on CPU.

    `before` is the allocated bytes (CUDA) or RSS (CPU) just before the run, so `peak - before` is what the run
    itself added.  `resettable` is False on CPU when the peak mark could not be reset: `peak` is then the
    process' lifetime peak (ru_maxrss) and only an upper bound.
    """

    peak: int
    before: int
    kind: str
    resettable: bool = True


def peak_memory(model: nn.Module, case: Case) -> PeakMemory:
    """Run `case(model)` once and report its peak memory (see `PeakMemory`)."""
    dev = device_of(model)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        case(model)
        sync(dev)
        return PeakMemory(torch.cuda.max_memory_allocated(dev), before, "cuda_max_memory_allocated")
    gc.collect()  # objects of earlier runs held in reference cycles (a KV cache) would be freed mid-run
    ok = _reset_peak_rss()
    before = (_rss_kib("VmRSS") or 0) * 1024
    case(model)
    if ok and _rss_kib("VmHWM") is not None:
        return PeakMemory(_rss_kib("VmHWM") * 1024, before, "cpu_peak_rss")
    return PeakMemory(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, before, "cpu_max_rss", False)


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# -- ideal speed-up ----------------------------------------------------------------------------------------
def linear_macs(model: nn.Module, tokens: int, head_tokens: int | None = None) -> int:
    """Multiply-accumulates of every `nn.Linear` for `tokens` tokens; the output head on `head_tokens` only."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            n = tokens if mod is not head or head_tokens is None else head_tokens
            total += mod.in_features * mod.out_features * n
    return total


def attention_width(model: nn.Module) -> list[int]:
    """heads × head_dim of every attention module (modules with `head_dim` and an `o_proj`/`out_proj`)."""
    out = []
    for mod in model.modules():
        proj = getattr(mod, "o_proj", None) or getattr(mod, "out_proj", None)
        if isinstance(getattr(mod, "head_dim", None), int) and isinstance(proj, nn.Linear):
            out.append(proj.in_features)
    return out


def attention_macs(model: nn.Module, batch: int, new: int, past: int = 0) -> int:
    """MACs of QKᵀ and AV for `new` causal query positions after `past` cached ones, summed over layers."""
    pairs = batch * sum(past + i + 1 for i in range(new))  # (query, key) pairs under the causal mask
    return sum(2 * w * pairs for w in attention_width(model))


def case_macs(model: nn.Module, batch: int, new: int, past: int = 0, all_logits: bool = True) -> dict[str, int]:
    """{"linear": …, "matmul": linear + attention} MACs of one forward of `new` tokens after `past` cached."""
    lin = linear_macs(model, batch * new, batch * new if all_logits else batch)
    return {"linear": lin, "matmul": lin + attention_macs(model, batch, new, past)}


def decode_macs(model: nn.Module, batch: int, prompt: int, new_tokens: int) -> dict[str, int]:
    """MACs of `new_tokens` single-token decode steps after a `prompt`-token prefill (see `case_macs`)."""
    steps = [case_macs(model, batch, 1, prompt + i) for i in range(new_tokens)]
    return {k: sum(s[k] for s in steps) for k in steps[0]}


def ideal_speedup(dense: dict[str, int], pruned: dict[str, int]) -> dict[str, float]:
    """Dense over pruned MACs, per kind ("linear", "matmul"): the speed-up if time were proportional to MACs."""
    return {k: dense[k] / pruned[k] for k in dense}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages ([] where unavailable)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
