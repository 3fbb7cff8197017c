"""What a layer kind is: the one table of the weight-carrying layers every pass prices, updates or rewrites.

Each kind says how its weight is seen as a matrix W (out, in) and which size attributes follow from its shape:

| kind     | module                                   | weight storage          | W (out, in)                    |
|----------|------------------------------------------|-------------------------|--------------------------------|
| linear   | ``nn.Linear``                            | (out, in)               | weight                         |
| conv1d   | Hugging Face ``Conv1D`` (GPT-2; ``nf``)  | (in, out)               | weightᵀ                        |
| conv2d   | ``nn.Conv2d`` (groups 1)                 | (out, c, kh, kw)        | weight.reshape(out, c·kh·kw)   |

HF ``Conv1D`` is recognised by class name and its ``nf`` attribute, so transformers need not be imported.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class LayerKind:
    """One row of the table.  `transposed`: the weight is stored (in, out)."""

    name: str
    transposed: bool

    def out_in(self, weight: Tensor) -> Tensor:
        """The weight (or any weight-shaped tensor) as W (out, in); a view where the storage allows."""
        if self.transposed:
            return weight.t()
        return weight.reshape(weight.shape[0], -1) if weight.dim() > 2 else weight

    def storage(self, W: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Inverse of `out_in`: W (out, in) back in the storage `shape` of the weight."""
        return (W.t() if self.transposed else W.reshape(shape)).contiguous()

    def size_attrs(self, module: nn.Module) -> dict[str, int]:
        """The module's size attributes as they follow from its (possibly new) weight shape."""
        w = module.weight
        if self.name == "linear":
            return {"in_features": w.shape[1], "out_features": w.shape[0]}
        if self.name == "conv1d":
            return {"nf": w.shape[1]}
        return {"in_channels": w.shape[1], "out_channels": w.shape[0]}


LINEAR, CONV1D, CONV2D = LayerKind("linear", False), LayerKind("conv1d", True), LayerKind("conv2d", False)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (weight stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def kind_of(module: nn.Module) -> LayerKind | None:
    """The module's kind, None when it has no (out, in) matrix view (grouped convs, norms, embeddings …)."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if is_hf_conv1d(module):
        return CONV1D
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return CONV2D
    return None


def matrix_kind(module: nn.Module) -> LayerKind:
    """`kind_of`, raising ValueError for a module without a matrix view."""
    kind = kind_of(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} has no (out, in) matrix view")
    return kind


def is_linear(module: nn.Module) -> bool:
    """A linear map of the last dimension: ``nn.Linear`` or HF ``Conv1D``."""
    return kind_of(module) in (LINEAR, CONV1D)


def has_curvature(module: nn.Module) -> bool:
    """Whether KFAC factors can be collected for the module: linear kinds, or a zero-padded ungrouped Conv2d
    (its inputs are unfolded into patches)."""
    kind = kind_of(module)
    if kind is CONV2D:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return kind is not None
