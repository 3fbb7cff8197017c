import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon_fx.passes.nm import nm_mask, topk_mask


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]),
    seed=st.integers(0, 1000),
)
def test_nm_mask_exact_counts(rows, groups, nm, seed):
    n, m = nm
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(scores, n, m)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert (keep.reshape(rows, groups, m).sum(-1) == n).all()
    # Every kept score is at least every pruned score of the same group.
    g = scores.reshape(rows, groups, m)
    k = keep.reshape(rows, groups, m)
    kept_min = torch.where(k, g, torch.inf).amin(-1)
    pruned_max = torch.where(~k, g, -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()


def test_nm_mask_picks_largest():
    scores = torch.tensor([[0.1, 5.0, 3.0, 0.2, 9.0, 8.0, 7.0, 1.0]])
    keep = nm_mask(scores, 2, 4)
    assert keep.tolist() == [[False, True, True, False, True, True, False, False]]


def test_nm_mask_rejects_bad_width():
    with pytest.raises(ValueError):
        nm_mask(torch.randn(2, 6), 2, 4)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_topk_mask_per_row_counts(sparsity):
    scores = torch.randn(5, 40)
    keep = topk_mask(scores, sparsity)
    assert (keep.sum(1) == 40 - int(sparsity * 40)).all()
    kept_min = torch.where(keep, scores, torch.inf).amin(1)
    pruned_max = torch.where(~keep, scores, -torch.inf).amax(1)
    assert (kept_min >= pruned_max).all()


def test_topk_mask_per_layer_counts():
    scores = torch.randn(4, 10)
    scores[0] += 100.0  # the first row should survive entirely
    keep = topk_mask(scores, 0.5, per_row=False)
    assert keep.sum() == 20
    assert keep[0].all()
