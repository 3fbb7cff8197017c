"""Damped factorisations and the nearest-Kronecker power iteration of passes/kron.py."""
import pytest
import torch

from surgeon_fx.passes.kron import (CurvatureError, apply_rg, damped_cholesky, damped_inverse, dense_fisher, kron_sum,
                         nearest_kron)


def _rearrange(F: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """Van Loan–Pitsianis R(F): F[(o,i),(p,j)] → R[(o,p),(i,j)], so G ⊗ A ↦ vec(G) vec(A)ᵀ."""
    return F.reshape(out, inp, out, inp).permute(0, 2, 1, 3).reshape(out * out, inp * inp)


def _svd_truncation(F: torch.Tensor, out: int, inp: int, rank: int) -> torch.Tensor:
    """Best rank-`rank` Kronecker sum by SVD of the explicit R(F), mapped back to F's layout."""
    U, S, Vh = torch.linalg.svd(_rearrange(F, out, inp))
    R = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    return R.reshape(out, out, inp, inp).permute(0, 2, 1, 3).reshape(out * inp, out * inp)


def test_escalates_damping_for_rank_deficient_factor():
    a = torch.randn(100, 5, dtype=torch.float64)
    a[:, 3:] = 0.0  # two input coordinates never active → A singular
    A = a.T @ a / 100
    assert int(torch.linalg.cholesky_ex(A).info) != 0
    L, damp = damped_cholesky(A, 0.0)
    assert damp > 0.0
    assert torch.isfinite(L).all()
    mean_diag = A.diagonal().mean()
    torch.testing.assert_close(L @ L.T, A + damp * mean_diag * torch.eye(5, dtype=A.dtype))
    inv, damp_inv = damped_inverse(A, 0.0)
    assert damp_inv == damp
    torch.testing.assert_close(inv @ (A + damp * mean_diag * torch.eye(5, dtype=A.dtype)),
                               torch.eye(5, dtype=A.dtype), atol=1e-6, rtol=1e-6)


def test_no_escalation_when_not_needed():
    M = torch.eye(3) * 4.0
    inv, damp = damped_inverse(M, 0.01)
    assert damp == 0.01
    torch.testing.assert_close(inv, torch.eye(3) / 4.04)


def test_clear_errors_name_the_layer():
    M = torch.eye(3)
    M[1, 1] = float("nan")
    with pytest.raises(CurvatureError, match="layer 'blk.0.fc'.*non-finite"):
        damped_inverse(M, 0.01, name="blk.0.fc")
    with pytest.raises(CurvatureError, match="layer 'neg'.*failed 3 times"):
        damped_cholesky(-torch.eye(3), 0.0, max_tries=3, name="neg")


def test_rank_one_examples_reduce_to_weighted_outer_products():
    g, a = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    A = torch.randn(3, 3, dtype=torch.float64)
    A = A @ A.T
    grads = g[:, :, None] * a[:, None, :]
    weights = torch.einsum("ni,ij,nj->n", a, A, a)
    torch.testing.assert_close(apply_rg(grads, A), (g.T * weights) @ g)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_power_iteration_matches_svd_of_rearranged_fisher(rank):
    torch.manual_seed(0)
    grads = torch.randn(40, 2, 3, dtype=torch.float64) @ torch.randn(3, 3, dtype=torch.float64)
    F = dense_fisher(grads)
    comps = nearest_kron(grads, rank=rank, iters=500, tol=1e-13)
    torch.testing.assert_close(kron_sum(comps), _svd_truncation(F, 2, 3, rank), atol=1e-7, rtol=1e-6)


def test_rank_r_errors_decrease_and_start_is_improved():
    torch.manual_seed(1)
    grads = torch.randn(30, 3, 4, dtype=torch.float64)
    F = dense_fisher(grads)
    start = (torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    err = [(F - kron_sum([start])).norm()]
    for rank in (1, 2, 3):
        err.append((F - kron_sum(nearest_kron(grads, rank=rank, init=start))).norm())
    assert err[0] > err[1] > err[2] > err[3]


def test_streamed_chunks_equal_in_memory_and_first_factor_is_psd():
    torch.manual_seed(2)
    grads = torch.randn(24, 3, 5, dtype=torch.float64)
    chunks = lambda: iter(grads.split(5))
    a = nearest_kron(grads, iters=30, norm=100.0)
    b = nearest_kron(chunks, iters=30, norm=100.0)
    torch.testing.assert_close(kron_sum(a), kron_sum(b), rtol=1e-9, atol=1e-12)
    G, A = a[0]
    sign = torch.sign(G.trace())  # the pair is defined up to a common sign flip
    assert torch.linalg.eigvalsh(sign * G).min() > -1e-5 * G.abs().max()
    assert torch.linalg.eigvalsh(sign * A).min() > -1e-5 * A.abs().max()
