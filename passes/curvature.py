"""Curvature pass: Kronecker-factored (KFAC) Fisher of the calibration loss, one factor pair per layer.

For a layer s = W a (W [out, in'], the input a gets a trailing 1 when the layer has a bias; a conv is unfolded
so every output position is a token with in' = in·kh·kw (+1)), with g = ∂loss/∂s per token:

    A = (1/T) Σ_t a_t a_tᵀ        [in', in']
    G = (1/(k T)) Σ_{s,t} g_t g_tᵀ  [out, out]     (k = Fisher samples per batch, 1 for the empirical Fisher)

T counts every token the layer sees (batch × sequence positions, or batch × output positions for a conv).
The loss of a batch is the SUM over its tokens of the natural-log cross-entropy (reduction "sum"), so g_t is
not shrunk by the batch or window size, and G ⊗ A ≈ (1/T) Σ_t (g_t ⊗ a_t)(g_t ⊗ a_t)ᵀ: the Fisher of the summed
calibration loss divided by T (multiply by T for the Fisher of the whole calibration set).  For a causal LM the
empirical loss has no label for the last position of a window; that position contributes its a_t to A and a
zero g_t to G.  A user `loss_fn` is used as it is: return a summed (not averaged) loss for the same scaling.

`fisher_approx="nearest"` replaces the pair by the nearest Kronecker product (Frobenius) to the per-sequence
Fisher F = (1/(k T)) Σ_n vec(∇W_n) vec(∇W_n)ᵀ, ∇W_n = Σ_{t∈n} g_t a_tᵀ the gradient of one sequence (batch
element), found by the streamed power iteration of `passes.kron` warm-started from the classic factors: one
extra pass over the calibration data per half-step (no ∇W_n is kept beyond its own batch).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from surgeon_fx.layers import has_curvature, matrix_kind
from surgeon_fx.passes.kron import CurvatureError, apply_ra, apply_rg


@dataclass
class KronFactors:
    """A [in', in'] = E[a aᵀ] and G [out, out] = E[g gᵀ] of one layer; `tokens` = T, tokens seen per pass."""
    A: Tensor
    G: Tensor
    tokens: int


def default_layers(model: nn.Module) -> list[str]:
    """Qualified names of every supported layer except the output head and layers tied to an embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [name for name, m in model.named_modules()
            if has_curvature(m) and m is not head and id(m.weight) not in tied]


def _inputs_rows(m: nn.Module, x: Tensor) -> Tensor:
    """Layer input as [B, P, in'] (P tokens per example; conv: unfolded output positions; bias → ones column)."""
    if isinstance(m, nn.Conv2d):
        x = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
    elif x.dim() == 1:
        x = x[None, None]
    elif x.dim() == 2:
        x = x[:, None]
    else:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    if m.bias is not None:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    return x


def _grad_rows(m: nn.Module, g: Tensor) -> Tensor:
    """Output gradient as [B, P, out], P matching `_inputs_rows`."""
    if isinstance(m, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    if g.dim() == 1:
        return g[None, None]
    if g.dim() == 2:
        return g[:, None]
    return g.reshape(g.shape[0], -1, g.shape[-1])


class _LayerStats:
    """Per-layer accumulators; `mode` is "kfac" (A and G sums), "A" or "G" (one power-iteration half-step)."""

    def __init__(self, name: str, module: nn.Module, device, dtype, reduce: bool = False):
        self.name, self.module, self.device, self.dtype, self.reduce = name, module, device, dtype, reduce
        self.A_sum = self.G_sum = self.acc = None
        self.tokens = self.g_rows = 0
        self.A = self.G = None
        self.mode = "kfac"

    def on_forward(self, x: Tensor, cache: dict) -> Tensor:
        """Accumulate a aᵀ of the layer input x (shared by consecutive layers reading the same tensor, such as
        q/k/v or gate/up: computed once through `cache`, which holds the last input only, and keeps it alive so
        its address cannot be reused while its key is there); return a [B, P, in']."""
        key = (x.data_ptr(), tuple(x.shape), type(self.module), self.module.bias is not None,
               getattr(self.module, "kernel_size", None), getattr(self.module, "stride", None),
               getattr(self.module, "padding", None), getattr(self.module, "dilation", None))
        if key not in cache:
            cache.clear()  # one [in', in'] product alive at a time
            a = _inputs_rows(self.module, x).to(self.device, self.dtype)
            flat = a.reshape(-1, a.shape[-1])
            prod = (LowerGram(flat.shape[1], flat.device, flat.dtype).add_gram_(flat) if self.mode == "kfac"
                    else None)
            cache[key] = (x, None if self.mode == "kfac" else a, prod, flat.shape[0])
        _, a, prod, rows = cache[key]
        if self.mode == "kfac":
            self.A_sum = prod.clone() if self.A_sum is None else self.A_sum.add_(prod)
            self.tokens += rows
        return a

    def on_grad(self, a: Tensor, g: Tensor) -> None:
        """Accumulate g gᵀ (mode "kfac") or one rearranged-Fisher map of ∇W_n = Σ_t g_t a_tᵀ per example."""
        g = _grad_rows(self.module, g).to(self.device, self.dtype)
        self.g_rows += g.shape[0] * g.shape[1]
        if self.mode == "kfac":
            flat = g.reshape(-1, g.shape[-1])
            if self.G_sum is None:
                self.G_sum = LowerGram(flat.shape[1], flat.device, flat.dtype)
            self.G_sum.add_gram_(flat)
            return
        grads = g.transpose(1, 2) @ a  # [B, out, in']
        part = apply_ra(grads, self.G) if self.mode == "A" else apply_rg(grads, self.A)
        self.acc = part if self.acc is None else self.acc.add_(part)

    def finish_pass(self) -> None:
        """Turn the sums of the pass just run into factors (classic normalisation or least-squares update);
        with `reduce`, the sums and counts of every process are added first (all-reduce)."""
        if self.reduce:
            self._all_reduce()
        if self.mode == "kfac":
            if self.A_sum is None or self.G_sum is None:
                raise CurvatureError(f"layer {self.name!r} saw no {'input' if self.A_sum is None else 'gradient'}"
                                     " during collection (is it used by the model's forward and the loss?)")
            self.A = self.A_sum.full().div_(self.tokens)
            self.G = self.G_sum.full().div_(self.g_rows)
            self.A_sum = self.G_sum = None
        elif self.mode == "A":
            self.A = _sym(self.acc) / self.g_rows / (self.G * self.G).sum()
        else:
            self.G = _sym(self.acc) / self.g_rows / (self.A * self.A).sum()
        self.acc, self.g_rows = None, 0

    def _all_reduce(self) -> None:
        """Sum A_sum, G_sum (or the power-iteration accumulator) and the token counts over all processes."""
        dist = torch.distributed
        sums = [self.A_sum, self.G_sum] if self.mode == "kfac" else [self.acc]
        if any(t is None for t in sums):
            raise CurvatureError(f"layer {self.name!r} saw no input or gradient on rank {dist.get_rank()}")
        sums = [t.flat if isinstance(t, LowerGram) else t for t in sums]
        for t in sums:
            dist.all_reduce(t)
        tokens = self.tokens if self.mode == "kfac" else 0  # counted in the classic pass only
        counts = torch.tensor([tokens, self.g_rows], dtype=torch.int64, device=sums[0].device)
        dist.all_reduce(counts)
        self.tokens, self.g_rows = (int(counts[0]) if self.mode == "kfac" else self.tokens), int(counts[1])


GRAM_BLOCK = 256  # columns per block on the CPU
GRAM_BLOCK_GPU = 2048  # on an accelerator: fewer, larger GEMMs (kernel launches dominate 256-wide blocks there)


def _gram_block(device: torch.device) -> int:
    return GRAM_BLOCK if device.type == "cpu" else GRAM_BLOCK_GPU


class LowerGram:
    """Running sum S = Σ xᵀx [d, d] kept as its blocks on and below the diagonal only (`_gram_block` columns
    each), in one flat buffer: about (nb+1)/(2nb) of the d² entries and of the multiply-adds for nb blocks
    (58% at d = 1536 with 256-wide blocks).  `full()` mirrors the blocks into the symmetric [d, d] matrix."""

    def __init__(self, d: int, device, dtype):
        self.d, self.b = d, _gram_block(torch.device(device))
        edges = list(range(0, d, self.b))
        self.spans = [(i, j, min(self.b, d - i), min(self.b, d - j)) for i in edges for j in edges if j <= i]
        self.flat = torch.zeros(sum(h * w for _, _, h, w in self.spans), device=device, dtype=dtype)
        self.blocks, pos = [], 0
        for _, _, h, w in self.spans:
            self.blocks.append(self.flat[pos:pos + h * w].view(h, w))
            pos += h * w

    def add_gram_(self, x: Tensor) -> "LowerGram":
        """S += xᵀx for x [T, d] (lower blocks only)."""
        for (i, j, h, w), block in zip(self.spans, self.blocks):
            block.addmm_(x[:, i:i + h].T, x[:, j:j + w])
        return self

    def add_(self, other: "LowerGram") -> "LowerGram":
        self.flat.add_(other.flat)
        return self

    def clone(self) -> "LowerGram":
        out = LowerGram.__new__(LowerGram)
        out.d, out.b, out.spans, out.flat = self.d, self.b, self.spans, self.flat.clone()
        out.blocks, pos = [], 0
        for _, _, h, w in self.spans:
            out.blocks.append(out.flat[pos:pos + h * w].view(h, w))
            pos += h * w
        return out

    def full(self) -> Tensor:
        """The exactly symmetric [d, d] sum: blocks above the diagonal are the transposed ones below, and each
        diagonal block is its own lower triangle mirrored (a GEMM's xᵀx need not be bitwise symmetric)."""
        out = self.flat.new_empty(self.d, self.d)
        for (i, j, h, w), block in zip(self.spans, self.blocks):
            if i == j:
                out[i:i + h, i:i + h] = block.tril() + block.tril(-1).T
            else:
                out[i:i + h, j:j + w] = block
                out[j:j + w, i:i + h] = block.T
        return out


def _sym(M: Tensor) -> Tensor:
    """(M + Mᵀ)/2: removes the rounding asymmetry of ∇Wᵀ G ∇W sums."""
    return (M + M.T) / 2


def _logits(out: Any) -> Any:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _to(batch: Any, device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def _batches(windows: Tensor | Iterable, batch_size: int) -> list:
    if isinstance(windows, Tensor):
        return list(windows.split(batch_size))
    return list(windows)


def _losses(model, batch, fisher: str, samples: int, loss_fn, gen: torch.Generator) -> Iterable[Tensor]:
    """Yield the loss(es) of one batch, one per backward pass (k for the sampled Fisher)."""
    if fisher == "sampled":
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = _logits(model(inputs))
        if isinstance(logits, Tensor) and logits.is_floating_point() and logits.dim() >= 2:
            flat = logits.reshape(-1, logits.shape[-1]).float()
            probs = flat.detach().softmax(-1)
            for _ in range(samples):
                labels = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(flat.device)
                yield F.cross_entropy(flat, labels, reduction="sum")
            return
        warnings.warn("sampled Fisher: model output is not a logits tensor; using the empirical loss_fn")
    if loss_fn is not None:
        yield loss_fn(model, batch)
        return
    logits = _logits(model(batch))
    vocab = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), batch[:, 1:].reshape(-1), reduction="sum")
    del logits  # the loss keeps what its backward needs; holding the logits here too costs a window's worth
    yield loss


def collect_kfac(model: nn.Module, windows: Tensor | Iterable, layers: list[str] | None = None,
                 fisher: str = "empirical", samples: int = 1, batch_size: int = 1, device="cpu",
                 dtype: torch.dtype = torch.float32, offload: bool = False, progress: bool | None = None,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, fisher_approx: str = "kfac",
                 power_iters: int = 2, seed: int = 0, store=None, max_factor_bytes: int | None = None,
                 distributed: bool = True) -> dict[str, KronFactors]:
    """Kronecker factors (A, G) of the Fisher for each layer, keyed by qualified module name.

    windows: LongTensor [n, L] of token ids for a causal LM (model(ids) → logits or an object with .logits),
      split into batches of `batch_size`; with `loss_fn(model, batch) → summed loss` it may also be any iterable
      of batches (a tensor, or a tuple whose first item is the model input).
    layers: names of nn.Linear / nn.Conv2d / HF Conv1D modules; None = `default_layers(model)`.
    fisher: "empirical" (true next-token labels, or `loss_fn`) or "sampled" (labels drawn from the model's
      softmax over the last output dim, `samples` draws per batch, each with its own backward pass).
    fisher_approx: "kfac" (classic, independence of a and g) or "nearest" (streamed power iteration,
      `power_iters` extra passes over the data, alternately updating A then G, warm-started from classic).
    device/dtype: where and in which precision factors accumulate (batches are moved to `device`; the model is
      expected there already, or dispatched by accelerate hooks); offload moves the results to the CPU.
    store: a `passes.factor_store.FactorStore` (or anything with `put(name, KronFactors)`): each layer's
      factors go there as soon as they are finished, and the store is returned.
    max_factor_bytes: bound on the accumulators alive at once (A and G sums, `dtype`): the layers are split into
      chunks whose sums fit, and each chunk makes its own passes over the data (None: one chunk).
    distributed: when torch.distributed is initialized with more than one process, rank r takes batches
      r, r + N, … and the sums and token counts are all-reduced, so every rank returns the factors of all
      windows (equal to one process's up to float summation order).
    Parameters are frozen while collecting (no weight-gradient GEMMs, no .grad) and their requires_grad flags
    and the model's train/eval mode are restored afterwards; the model runs in eval mode (no dropout).
    """
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', not {fisher!r}")
    if fisher_approx not in ("kfac", "nearest"):
        raise ValueError(f"fisher_approx must be 'kfac' or 'nearest', not {fisher_approx!r}")
    modules = dict(model.named_modules())
    names = default_layers(model) if layers is None else list(layers)
    for name in names:
        if name not in modules or not has_curvature(modules[name]):
            raise ValueError(f"{name!r} is not an nn.Linear, zero-padded ungrouped nn.Conv2d or HF Conv1D of the model")
    batches = list(enumerate(_batches(windows, batch_size)))
    world, rank = _world() if distributed else (1, 0)
    if world > 1:
        if len(batches) < world:
            raise ValueError(f"{len(batches)} calibration batches cannot be split over {world} processes")
        batches = batches[rank::world]
    passes = ["kfac"] + (["A", "G"] * power_iters)[:power_iters] if fisher_approx == "nearest" else ["kfac"]
    chunks = _chunks(names, modules, torch.tensor([], dtype=dtype).element_size(), max_factor_bytes)
    out_device = "cpu" if offload else device
    result = store if store is not None else {}
    bar = tqdm(total=len(chunks) * len(passes) * len(batches), desc="curvature",
               disable=not (sys.stderr.isatty() if progress is None else progress))
    try:
        for chunk in chunks:
            stats = {name: _LayerStats(name, modules[name], device, dtype, world > 1) for name in chunk}
            _run_passes(model, stats, batches, passes, fisher, samples, loss_fn, seed, device, bar)
            for name in chunk:  # the last pass's sums become factors one layer at a time (a store packs them)
                st = stats.pop(name)
                st.finish_pass()
                factors = KronFactors(st.A.to(out_device), st.G.to(out_device), st.tokens)
                del st
                if store is not None:
                    store.put(name, factors)
                else:
                    result[name] = factors
                del factors
    finally:
        bar.close()
    return result


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) when torch.distributed is not initialized."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _chunks(names: list[str], modules: dict, element_size: int, max_bytes: int | None) -> list[list[str]]:
    """Consecutive runs of `names` whose A and G sums ((in'² + out²) · element_size bytes each) fit `max_bytes`
    (a layer larger than the bound gets a chunk of its own)."""
    if max_bytes is None:
        return [names]
    chunks, size = [[]], 0
    for name in names:
        m = modules[name]
        out_dim, in_dim = _matrix_shape(m)
        need = (in_dim * in_dim + out_dim * out_dim) * element_size
        if chunks[-1] and size + need > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += need
    return chunks


def _matrix_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in') of the layer's factor view (see the module docstring)."""
    out_dim, in_dim = matrix_kind(m).out_in(m.weight).shape
    return out_dim, in_dim + (m.bias is not None)


def _run_passes(model: nn.Module, stats: dict[str, _LayerStats], batches: list[tuple[int, Any]], passes: list[str],
                fisher: str, samples: int, loss_fn, seed: int, device, bar) -> None:
    """Every pass of `passes` over `batches` ((global index, batch) pairs) with hooks on the layers of `stats`;
    every pass but the last ends with `finish_pass` (the next one needs the factors), the last is left to the
    caller."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    cache: dict = {}
    handles = []
    for st in stats.values():
        handles.append(st.module.register_forward_pre_hook(_make_input_leaf))
        handles.append(st.module.register_forward_hook(_make_capture(st, cache)))
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        gen = torch.Generator()
        for k, mode in enumerate(passes):
            for st in stats.values():
                st.mode = mode
            for i, batch in batches:
                gen.manual_seed(seed * 1_000_003 + i)
                cache.clear()
                with torch.enable_grad():
                    losses = list(_losses(model, _to(batch, device), fisher, samples, loss_fn, gen))
                    for j, loss in enumerate(losses):
                        if not loss.requires_grad:
                            raise CurvatureError("the loss does not depend on any selected layer's output")
                        loss.backward(retain_graph=j < len(losses) - 1)
                del losses
                bar.update(1)
            if k < len(passes) - 1:  # the caller finishes the last pass layer by layer
                for st in stats.values():
                    st.finish_pass()
    finally:
        cache.clear()
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _make_input_leaf(module: nn.Module, args: tuple):
    """Forward pre-hook: make a layer input that carries no graph a grad-requiring leaf, so the layer output
    (and everything downstream) is differentiated while the parameters stay frozen."""
    x = args[0]
    if isinstance(x, Tensor) and x.is_floating_point() and not x.requires_grad:
        return (x.detach().requires_grad_(True),) + tuple(args[1:])
    return None


def _make_capture(st: _LayerStats, cache: dict):
    """Forward hook: accumulate A, and hook the output so its gradient reaches `st.on_grad` (the input rows
    are kept for the backward only during power-iteration passes)."""
    def hook(module: nn.Module, args: tuple, output: Tensor):
        a = st.on_forward(args[0].detach(), cache)
        if isinstance(output, Tensor) and output.requires_grad:
            if st.mode == "kfac":
                output.register_hook(lambda g: st.on_grad(None, g))
            else:
                output.register_hook(lambda g: st.on_grad(a, g))
    return hook
