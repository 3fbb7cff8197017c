"""Sequential block-by-block driver shared by SparseGPT and Wanda.

The procedure of the SparseGPT paper: find the model's repeated blocks (the
largest ``nn.ModuleList``), capture the inputs of the first block (hidden states
plus the extra arguments the model passes, e.g. attention mask and rotary
position embeddings) with a pre-hook that stops the forward pass, then for each
block in turn:

1. run the block on its inputs with forward hooks on its linear layers that
   accumulate input statistics (Σ x xᵀ or Σ x² over all calibration tokens);
2. prune every linear layer of the block from those statistics;
3. rerun the pruned block; its outputs are the next block's inputs.

Only linear layers inside the blocks are pruned (never embeddings or lm_head).
Hugging Face ``Conv1D`` (GPT-2) is a linear layer whose weight is stored [in, out].
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from surgeon_fx.evaluate import logits_of
from surgeon_fx.layers import is_linear, matrix_kind


@dataclass
class InputStats:
    """Running statistics of one layer's inputs x ∈ R^in over ``n`` tokens.

    full=True: ``total`` = Σ x xᵀ [in, in]; full=False: ``total`` = Σ x² [in].  ``sum`` = Σ x [in] (float64).
    ``dtype``: the precision ``total`` is accumulated in.
    """

    full: bool
    dtype: torch.dtype = torch.float32
    n: int = 0
    total: torch.Tensor | None = None
    sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        s_x = x.sum(0, dtype=torch.float64)
        x = x.to(self.dtype)
        s = x.T @ x if self.full else (x * x).sum(0)
        self.total = s if self.total is None else self.total + s
        self.sum = s_x if self.sum is None else self.sum + s_x
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 X Xᵀ / n [in, in] (needs full=True)."""
        if not self.full:
            raise ValueError("hessian() needs full=True statistics")
        return 2.0 * self.total / self.n

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ = sqrt(Σ_tokens x_j²) [in]."""
        return self._squares().sqrt()

    def mean(self) -> torch.Tensor:
        """x̄_j = Σ x_j / n [in] (float64)."""
        return self.sum / self.n

    def variance(self) -> torch.Tensor:
        """Sample variance over tokens, (Σ x_j² − n x̄_j²) / (n − 1) [in], in float64 (accumulate with
        dtype=torch.float64 where the mean is large against the spread)."""
        if self.n < 2:
            raise ValueError("variance() needs at least two tokens")
        return ((self._squares().double() - self.n * self.mean() ** 2) / (self.n - 1)).clamp_min(0.0)

    def _squares(self) -> torch.Tensor:
        return torch.diagonal(self.total) if self.full else self.total


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the most parameters: the model's repeated blocks."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError("model has no nn.ModuleList of blocks")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The linear layer's weight as [out, in] (a view)."""
    return matrix_kind(module).out_in(module.weight)


@torch.no_grad()
def set_weight_out_in(module: nn.Module, W: torch.Tensor) -> None:
    """Write W [out, in] back in the module's own orientation and dtype."""
    weight_out_in(module).copy_(W.to(module.weight.dtype))


def _same(a, b) -> bool:
    """Structural equality of captured arguments (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, bool, str)) and a == b)


@dataclass
class BlockInput:
    """One calibration batch at a block boundary: hidden [B, L, d] and the other call arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    def call(self, block: nn.Module) -> torch.Tensor:
        """Run ``block`` with ``hidden`` as its hidden states; return the output hidden states."""
        if "hidden_states" in self.kwargs:
            out = block(*self.args, **{**self.kwargs, "hidden_states": self.hidden})
        else:
            out = block(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor,
                         batch_size: int = 1) -> list[BlockInput]:
    """Inputs of ``block`` for windows [k, L], batch by batch; the forward stops at the block.

    Extra arguments equal to the previous batch's are shared, not stored twice
    (a [B, 1, L, L] attention mask is the same for every batch).
    """
    captured: list[BlockInput] = []

    def hook(_module, args, kwargs):
        if "hidden_states" in kwargs:
            hidden, rest = kwargs["hidden_states"], args
        else:
            hidden, rest = args[0], args[1:]
        if captured and _same(rest, captured[-1].args) and _same(kwargs, captured[-1].kwargs):
            rest, kwargs = captured[-1].args, captured[-1].kwargs
        captured.append(BlockInput(hidden, rest, kwargs))
        raise _StopForward

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                logits_of(model, windows[start : start + batch_size].to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


BlockVisit = Callable[[str, nn.Module, dict[str, InputStats]], bool]


@torch.no_grad()
def run_blocks(model: nn.Module, windows: torch.Tensor, visit: BlockVisit, new_stats: Callable[[], InputStats],
               batch_size: int = 1, progress: bool | None = None, layers: set[str] | None = None) -> None:
    """Run the blocks in order on the calibration windows [k, L], collecting input statistics.

    For each block: hooks on its linear layers accumulate ``new_stats()`` statistics over every window, then
    ``visit(prefix, block, stats)`` may change the block (prefix = "<blocks>.<i>.", stats keyed by qualified
    layer name, only layers the block called) and returns whether it did; a changed block is rerun, and its
    outputs feed the next block.
    layers: qualified names of the only layers to collect (None: every linear layer of the blocks).
    """
    blocks_name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], windows, batch_size)
    disable = None if progress is None else not progress  # tqdm's None: quiet off a terminal
    for index, block in enumerate(tqdm(blocks, desc="blocks", disable=disable)):
        prefix = f"{blocks_name}.{index}."
        hooked = {prefix + name: m for name, m in block.named_modules()
                  if is_linear(m) and (layers is None or prefix + name in layers)}
        stats = {name: new_stats() for name in hooked}
        handles = [m.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
                   for name, m in hooked.items()]
        try:
            outputs = [batch.call(block) for batch in inputs]
        finally:
            for handle in handles:
                handle.remove()
        changed = visit(prefix, block, {name: s for name, s in stats.items() if s.n})  # n = 0: never called
        for batch, out in zip(inputs, outputs):
            batch.hidden = batch.call(block) if changed else out


PruneFn = Callable[[torch.Tensor, InputStats], tuple[torch.Tensor, torch.Tensor]]


def prune_sequential(model: nn.Module, windows: torch.Tensor, prune_layer: PruneFn, full_gram: bool,
                     batch_size: int = 1, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Prune the linear layers of every block in order, in place.

    prune_layer(W [out, in] float32, InputStats) -> (W_new [out, in], keep mask [out, in] bool).
    full_gram selects Σ x xᵀ (True) or Σ x² (False) statistics.
    Returns {qualified layer name: keep mask}.
    """
    modules = dict(model.named_modules())
    masks: dict[str, torch.Tensor] = {}

    def visit(_prefix: str, _block: nn.Module, stats: dict[str, InputStats]) -> bool:
        for name, s in stats.items():
            W_new, keep = prune_layer(weight_out_in(modules[name]).detach().float(), s)
            set_weight_out_in(modules[name], W_new)
            masks[name] = keep
        return True

    run_blocks(model, windows, visit, lambda: InputStats(full_gram), batch_size, progress)
    return masks
