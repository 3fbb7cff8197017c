"""Closed-form updates against the explicitly solved constrained quadratic problem (float64)."""
import pytest
import torch

from surgeon_fx.passes.update import remove_rows_cols, rowwise_update

from tests.kkt import F64, kkt, spd


def random_mask(out, inn, gen, p=0.4):
    m = torch.rand(out, inn, generator=gen) < p
    m[0] = False  # a row with nothing removed
    m[1] = True   # a row removed completely
    return m


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [1, 1 << 24])  # budget 1: one row per chunk
def test_rowwise_update_is_exact_for_row_decoupled_curvature(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    out, inn = 5, 7
    W, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(inn, gen)
    g = torch.rand(out, generator=gen, dtype=F64) + 0.5
    F = torch.kron(torch.diag(g), A)
    removed = random_mask(out, inn, gen)
    removed[:, -1] = False  # last column as a bias column: never removed, but updated
    x, _ = kkt(F, W.reshape(-1), removed.reshape(-1).nonzero()[:, 0])
    new = rowwise_update(W, torch.linalg.inv(A), removed, budget=budget)
    torch.testing.assert_close(new - W, x.reshape(out, inn), rtol=1e-9, atol=1e-10)
    assert (new[removed] == 0).all()


def test_rowwise_update_row_local_optimum_with_full_g():
    """With a full G, each row's update is the optimum when only that row may change."""
    gen = torch.Generator().manual_seed(7)
    out, inn, i = 4, 6, 2
    W, G, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(out, gen), spd(inn, gen)
    removed = torch.zeros(out, inn, dtype=torch.bool)
    removed[i, [0, 3, 4]] = True
    F_row = G[i, i] * A  # curvature of row i alone
    x, _ = kkt(F_row, W[i], torch.tensor([0, 3, 4]))
    new = rowwise_update(W, torch.linalg.inv(A), removed)
    torch.testing.assert_close(new[i] - W[i], x, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(new[[0, 1, 3]], W[[0, 1, 3]])


def test_rowwise_update_keeps_earlier_zeros_as_constraints():
    gen = torch.Generator().manual_seed(3)
    W, A = torch.randn(6, 8, generator=gen, dtype=F64), spd(8, gen)
    old = torch.rand(6, 8, generator=gen) < 0.3
    W[old] = 0
    new_removed = old | (torch.rand(6, 8, generator=gen) < 0.2)
    new = rowwise_update(W, torch.linalg.inv(A), new_removed)
    assert (new[new_removed] == 0).all()
    # Without the earlier zeros as constraints they would move: the constrained update differs.
    loose = rowwise_update(W, torch.linalg.inv(A), new_removed & ~old)
    assert (loose[old] != 0).any()


@pytest.mark.parametrize("seed", range(5))
def test_joint_rows_and_columns_match_kkt(seed):
    gen = torch.Generator().manual_seed(seed)
    out, inn = 6, 7
    W, G, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(out, gen), spd(inn, gen)
    F = torch.kron(G, A)
    rows, cols = torch.tensor([1, 4]), torch.tensor([0, 2, 5])
    mask = torch.zeros(out, inn, dtype=torch.bool)
    mask[rows] = True
    mask[:, cols] = True
    x, _ = kkt(F, W.reshape(-1), mask.reshape(-1).nonzero()[:, 0])
    new = remove_rows_cols(W, torch.linalg.inv(G), torch.linalg.inv(A), rows, cols)
    torch.testing.assert_close(new - W, x.reshape(out, inn), rtol=1e-9, atol=1e-10)
    assert (new[mask] == 0).all()


def test_rows_only_and_cols_only():
    gen = torch.Generator().manual_seed(11)
    W, G, A = torch.randn(5, 4, generator=gen, dtype=F64), spd(5, gen), spd(4, gen)
    Gi, Ai = torch.linalg.inv(G), torch.linalg.inv(A)
    none = torch.zeros(0, dtype=torch.long)
    r = remove_rows_cols(W, Gi, Ai, torch.tensor([2]), none)
    c = remove_rows_cols(W, Gi, Ai, none, torch.tensor([1]))
    assert (r[2] == 0).all() and (r[[0, 1, 3, 4]] != W[[0, 1, 3, 4]]).all()
    assert (c[:, 1] == 0).all() and (c[:, [0, 2, 3]] != W[:, [0, 2, 3]]).all()
