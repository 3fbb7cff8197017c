"""The layer-kind table (surgeon_fx/layers.py): matrix views, their inverse and size attributes."""
import pytest
import torch
from torch import nn

from surgeon_fx.hf import tiny_gpt2
from surgeon_fx.layers import CONV1D, CONV2D, LINEAR, has_curvature, is_linear, kind_of, matrix_kind


def _conv1d() -> nn.Module:
    return tiny_gpt2().transformer.h[0].attn.c_attn  # HF Conv1D, weight (in, out)


@pytest.mark.parametrize("make,kind,out_dim", [
    (lambda: nn.Linear(5, 3), LINEAR, 3),
    (_conv1d, CONV1D, 96),
    (lambda: nn.Conv2d(4, 6, 3), CONV2D, 6),
])
def test_out_in_round_trip(make, kind, out_dim):
    m = make()
    assert kind_of(m) is kind and matrix_kind(m) is kind
    W = kind.out_in(m.weight)
    assert W.shape[0] == out_dim and W.dim() == 2
    assert torch.equal(kind.storage(W, m.weight.shape), m.weight)


def test_out_in_is_the_map_applied():
    """W (out, in) of every linear kind is the matrix the layer applies: y = x Wᵀ (+ b)."""
    x = torch.randn(2, 32)
    for m in (nn.Linear(32, 7), _conv1d()):
        y = m(x)
        assert torch.allclose(y, x @ matrix_kind(m).out_in(m.weight).T + m.bias, atol=1e-5)


def test_kinds_and_refusals():
    assert kind_of(nn.Conv2d(4, 4, 3, groups=4)) is None and kind_of(nn.LayerNorm(3)) is None
    with pytest.raises(ValueError, match="no \\(out, in\\) matrix view"):
        matrix_kind(nn.Embedding(3, 4))
    assert is_linear(_conv1d()) and not is_linear(nn.Conv2d(1, 1, 1))
    assert has_curvature(nn.Conv2d(2, 2, 3, padding=1)) and not has_curvature(nn.Conv2d(2, 2, 3, padding="same"))
    assert not has_curvature(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_size_attrs_follow_the_weight():
    m = nn.Linear(5, 3)
    m.weight = nn.Parameter(torch.zeros(2, 4))
    assert LINEAR.size_attrs(m) == {"in_features": 4, "out_features": 2}
    assert CONV1D.size_attrs(_conv1d()) == {"nf": 96}
