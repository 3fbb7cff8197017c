"""2:4 semi-structured sparse linear layers: PyTorch's `to_sparse_semi_structured` on an N:M-masked model.

A model pruned to 2:4 (at most 2 nonzeros in every 4 consecutive input weights of each row, e.g. by
`passes.nm.nm_mask`) still runs dense GEMMs.  `to_semi_structured` stores every qualifying `nn.Linear` weight in
the compressed 2:4 format (half the values plus 2-bit indices) so that `F.linear` dispatches to the sparse
tensor-core kernels (cuSPARSELt, or CUTLASS where cuSPARSELt is missing).  Those kernels exist only on CUDA GPUs
of compute capability ≥ 8.0 (Ampere and later) in fp16/bf16; anywhere else `SemiStructuredUnavailable` is
raised and nothing is changed: there is no fallback that would pretend to be sparse.

Shape rules (from torch.sparse.semi_structured): the weight's rows and columns must be multiples of 16 × 16
(cuSPARSELt) or 32 × 64 (CUTLASS) in fp16/bf16; a linear that does not fit, or whose weight is not 2:4, stays
dense and is listed in the report with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

DTYPES = (torch.float16, torch.bfloat16)
MIN_SHAPE = {"cusparselt": (16, 16), "cutlass": (32, 64)}  # (rows, cols) multiple, fp16/bf16


class SemiStructuredUnavailable(RuntimeError):
    """This machine cannot run 2:4 semi-structured sparse kernels."""


def check_available(device: torch.device | str | None = None) -> torch.device:
    """The CUDA device to use; raises `SemiStructuredUnavailable` without one of compute capability ≥ 8.0."""
    if not torch.cuda.is_available():
        raise SemiStructuredUnavailable("2:4 semi-structured sparsity needs a CUDA GPU with compute capability ≥ 8.0; "
                                        "this machine has none")
    dev = torch.device(device if device is not None and torch.device(device).type == "cuda" else "cuda")
    cc = torch.cuda.get_device_capability(dev)
    if cc < (8, 0):
        raise SemiStructuredUnavailable(f"2:4 semi-structured sparsity needs a CUDA GPU with compute capability ≥ 8.0; "
                                        f"{torch.cuda.get_device_name(dev)} has {cc[0]}.{cc[1]}")
    return dev


def backend() -> str:
    """"cusparselt" where PyTorch was built with it, else "cutlass"."""
    cslt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cslt is not None and cslt.is_available() else "cutlass"


def nm_violations(weight: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """How many blocks of `m` consecutive input weights (per row of [out, in]) hold more than `n` nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(f"need a 2-D weight whose input width is a multiple of {m}, got {tuple(weight.shape)}")
    nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    return int((nonzero > n).sum())


def skip_reason(weight: torch.Tensor, kind: str) -> str | None:
    """Why this linear weight cannot be stored 2:4 with backend `kind`, or None if it can."""
    rows, cols = weight.shape
    if cols % 4:
        return f"input width {cols} is not a multiple of 4"
    bad = nm_violations(weight)
    if bad:
        return f"not 2:4 ({bad} of {weight.numel() // 4} blocks have more than 2 nonzeros)"
    r, c = MIN_SHAPE[kind]
    if rows % r or cols % c:
        return f"shape {rows}×{cols} is not a multiple of {r}×{c} ({kind})"
    return None


@dataclass
class SemiStructuredReport:
    """Which linears now hold 2:4 sparse weights, which stayed dense and why."""

    backend: str
    dtype: torch.dtype
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def plan(model: nn.Module, kind: str | None = None) -> SemiStructuredReport:
    """Decide, without converting, which `nn.Linear` weights qualify (no GPU needed)."""
    kind = kind or backend()
    report = SemiStructuredReport(kind, next(model.parameters()).dtype)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            why = skip_reason(mod.weight.detach(), kind)
            if why is None:
                report.converted.append(name)
            else:
                report.skipped[name] = why
    return report


class SemiStructuredLinear(nn.Module):
    """A linear layer whose weight is a 2:4 semi-structured tensor; inputs of any rank are flattened to 2-D
    (the sparse tensor supports `linear` on 2-D inputs only: a 3-D one reaches an unsupported `expand`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16,
                       device: torch.device | str | None = None, kind: str | None = None) -> SemiStructuredReport:
    """Move `model` to the GPU in `dtype` and replace every qualifying 2:4 `nn.Linear` by a
    `SemiStructuredLinear`, in place.  `kind`: "cusparselt" or "cutlass" (default: `backend()`).

    Raises `SemiStructuredUnavailable` (model untouched) on a machine without a capable GPU.
    """
    if dtype not in DTYPES:
        raise ValueError(f"semi-structured weights need float16 or bfloat16, got {dtype}")
    dev = check_available(device)
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    kind = kind or backend()
    cls = SparseSemiStructuredTensorCUSPARSELT if kind == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    model.to(device=dev, dtype=dtype)
    report = plan(model, kind)
    report.dtype = dtype
    for name in report.converted:
        mod = model.get_submodule(name)
        new = SemiStructuredLinear(cls.from_dense(mod.weight.detach().contiguous()), mod.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return report


@torch.no_grad()
def relative_error(model: nn.Module, reference: nn.Module, inputs: tuple) -> float:
    """max |model(x) − reference(x)| / max |reference(x)|: the check of a converted model against the masked one.

    Outputs may be tensors or HF outputs with `.logits`.
    """
    def out(m):
        y = m(*inputs)
        return (y.logits if hasattr(y, "logits") else y).float()

    a, b = out(model), out(reference)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
