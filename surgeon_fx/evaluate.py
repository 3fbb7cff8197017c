"""Perplexity over fixed-length windows, as in the SparseGPT / LLM Surgeon harness.

For a window x[0..L-1] the model's logits at positions 0..L-2 predict tokens
1..L-1. With k windows the mean next-token negative log-likelihood is

    nll = (1 / (k (L-1))) Σ_w Σ_{t=1}^{L-1} -log p(x_t | x_<t),    ppl = exp(nll).

(Every window has the same length, so this equals the harness's mean of
per-window mean losses.)

Zero-shot downstream accuracy (the paper's second table) is a later step and belongs here, beside
`perplexity`: a scorer taking (model, multiple-choice examples) and returning accuracy from the summed
log-likelihood of each choice under `logits_of`.  `bench/prune_matrix.py` records `"zero_shot": {}` in every
run for its results.
"""

import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll is per predicted token; tokens = windows * (length - 1)."""

    ppl: float
    nll: float
    tokens: int
    windows: int


def _accepts_use_cache(model: torch.nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on input_ids [B, L]; return logits [B, L, V].

    Works with Hugging Face causal LMs (output ``.logits``; the KV cache is
    switched off) and with plain modules that return the logits tensor.
    """
    out = model(input_ids, use_cache=False) if _accepts_use_cache(model) else model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def main_output(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """The model's main output tensor for `inputs`: logits of a causal LM (KV cache off), `.logits` or the
    first tensor of any other model's output (`last_hidden_state` of an encoder)."""
    from surgeon_fx.trace import is_hf_causal_lm

    if is_hf_causal_lm(model):
        return logits_of(model, inputs[0])
    out = model(*inputs)
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out if isinstance(out, torch.Tensor) else out[0]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    autocast: torch.dtype | None = None,
) -> PerplexityResult:
    """Mean next-token NLL and perplexity of ``model`` on windows [k, L].

    The model must already be on ``device``; windows are moved there ``batch_size`` at a time (one forward
    pass per batch).  autocast: run the forward under ``torch.autocast`` with this dtype (e.g. bfloat16
    matmuls); the cross-entropy is always float32.  progress=None shows a tqdm bar only when stderr is a
    terminal.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [k, L] with L >= 2, got shape {tuple(windows.shape)}")
    if progress is None:
        progress = sys.stderr.isatty()
    k, length = windows.shape
    total = 0.0
    starts = range(0, k, batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            logits = logits_of(model, batch)[:, :-1]
        targets = batch[:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        ).item()
    tokens = k * (length - 1)
    nll = total / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=k)
