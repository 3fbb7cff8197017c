"""Closed-form updates against the explicitly solved constrained quadratic problem (float64)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgeon_fx.passes.baselines import layer_curvature
from surgeon_fx.passes.blocks import to_matrix
from surgeon_fx.passes.nm import nm_mask
from surgeon_fx.passes.surgeon import SurgeonConfig, prune
from surgeon_fx.passes.update import col_update, remove_rows_cols, rowwise_update, sweep_update

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


def nested_mask(out, inn, gen):
    """Every row removes a prefix of one random column order (its own length, 0 … inn)."""
    order = torch.randperm(inn, generator=gen)
    lengths = torch.randint(0, inn + 1, (out,), generator=gen)
    lengths[0], lengths[1] = 0, inn
    m = torch.zeros(out, inn, dtype=torch.bool)
    for i, k in enumerate(lengths.tolist()):
        m[i, order[:k]] = True
    return m


def row_losses(W, new, A):
    """[out] per-row objective δ A δᵀ of the update δ = new − W."""
    D = new - W
    return ((D @ A) * D).sum(1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block", [1, 3, 128])
def test_sweep_equals_exact_rule_for_nested_masks(seed, block):
    """Removed sets that are prefixes of one column order: the sweep visits them first, so it is exact."""
    gen = torch.Generator().manual_seed(seed)
    out, inn = 7, 10
    W, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(inn, gen)
    removed = nested_mask(out, inn, gen)
    new = sweep_update(W, A, removed, refine=0, block=block)
    torch.testing.assert_close(new, rowwise_update(W, torch.linalg.inv(A), removed), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sweep_update(W, A, removed, block=block), new, rtol=1e-9, atol=1e-10)
    x, _ = kkt(torch.kron(torch.eye(out, dtype=F64), A), W.reshape(-1), removed.reshape(-1).nonzero()[:, 0])
    torch.testing.assert_close(new - W, x.reshape(out, inn), rtol=1e-9, atol=1e-10)
    assert (new[removed] == 0).all()


def test_sweep_whole_columns_is_the_column_update():
    gen = torch.Generator().manual_seed(2)
    W, A = torch.randn(5, 8, generator=gen, dtype=F64), spd(8, gen)
    A_inv, cols = torch.linalg.inv(A), torch.tensor([1, 4, 6])
    removed = torch.zeros(5, 8, dtype=torch.bool)
    removed[:, cols] = True
    torch.testing.assert_close(sweep_update(W, A, removed, refine=0) - W, col_update(W, A_inv, cols),
                               rtol=1e-9, atol=1e-10)


def nm_removed_mask(out, inn, gen, n=2, m=4):
    return ~nm_mask(torch.rand(out, inn, generator=gen), n, m)


@pytest.mark.parametrize("kind", ["random", "2:4"])
@pytest.mark.parametrize("seed", range(3))
def test_sweep_solves_its_triangular_system(kind, seed):
    """Without refinement, in the visiting order π (most-removed first) and with A = Lᵀ L, L lower
    triangular: δ_R = −W_R and (L δ)_j = 0 for every kept j."""
    gen = torch.Generator().manual_seed(seed)
    out, inn = 6, 12
    W, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(inn, gen)
    removed = random_mask(out, inn, gen) if kind == "random" else nm_removed_mask(out, inn, gen)
    new = sweep_update(W, A, removed, refine=0, block=5)
    assert (new[removed] == 0).all()
    order = torch.argsort(removed.sum(0), descending=True, stable=True)
    Ap = A[order][:, order]
    L = torch.linalg.cholesky(Ap.flip(0, 1)).flip(0, 1).t()  # lower, Lᵀ L = Ap
    torch.testing.assert_close(L.t() @ L, Ap)
    z = (new - W)[:, order] @ L.t()  # rows of L δ
    assert z[~removed[:, order]].abs().max() < 1e-10


@pytest.mark.parametrize("kind", ["random", "2:4"])
@pytest.mark.parametrize("seed", range(3))
def test_refinement_descends_to_the_exact_rule(kind, seed):
    """Conjugate-gradient steps lower every row's objective monotonically, from the sweep's down to the exact
    rule's, which they reach after at most |K_i| steps."""
    gen = torch.Generator().manual_seed(seed)
    out, inn = 6, 12
    W, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(inn, gen)
    removed = random_mask(out, inn, gen) if kind == "random" else nm_removed_mask(out, inn, gen)
    exact = rowwise_update(W, torch.linalg.inv(A), removed)
    losses = torch.stack([row_losses(W, sweep_update(W, A, removed, refine=k, block=5), A) for k in range(4)])
    assert (losses[1:] <= losses[:-1] * (1 + 1e-12)).all()
    assert (losses[-1] >= row_losses(W, exact, A) * (1 - 1e-12)).all()
    assert (losses[0] > losses[-1] * (1 + 1e-6)).any()  # the sweep alone is not exact here
    torch.testing.assert_close(sweep_update(W, A, removed, refine=inn, block=5), exact, rtol=1e-7, atol=1e-9)


def test_sweep_is_deterministic_and_keeps_constraints():
    gen = torch.Generator().manual_seed(3)
    W, A = torch.randn(9, 16, generator=gen, dtype=F64), spd(16, gen)
    old = torch.rand(9, 16, generator=gen) < 0.3
    W[old] = 0
    removed = old | (torch.rand(9, 16, generator=gen) < 0.2)
    removed[0] = False
    first, second = sweep_update(W, A, removed, block=4), sweep_update(W, A, removed, block=4)
    assert torch.equal(first, second)
    assert (first[removed] == 0).all()
    torch.testing.assert_close(first[0], W[0], rtol=0, atol=0)  # nothing removed in row 0: unchanged


class ConvNet(nn.Module):
    """A Conv2d (with bias), an HF Conv1D (weight stored (in, out)) and a Linear without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)  # 36 weight columns + bias: multiples of 4 for 2:4
        self.fc = Conv1D(8, 4 * 4 * 4)
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_driver_applies_the_sweep_through_matrix_views(structure):
    """Conv2d, HF Conv1D and Linear: the driver's update is `sweep_update` on each layer's matrix view
    [W b] with the damped A, removed weights are exactly zero and the bias column is updated, not removed."""
    torch.manual_seed(0)
    model = ConvNet().to(F64)
    gen = torch.Generator().manual_seed(5)
    factors = {}
    for name in ("conv", "fc", "out"):
        M = to_matrix(model.get_submodule(name), model.get_submodule(name).weight, model.get_submodule(name).bias)
        factors[name] = SimpleNamespace(A=spd(M.shape[1], gen), G=spd(M.shape[0], gen))
    dense = {name: to_matrix(m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
             for name, m in model.named_children()}
    config = SurgeonConfig(structure=structure, target=0.5, shots=1)
    result = prune(model, torch.zeros(1), None, config, collect_curvature=lambda m, w: factors)
    assert set(result.kept) == set(factors)
    for name, m in model.named_children():
        c = layer_curvature("kfac", *dense[name].shape, factors[name], config.damp_a, config.g_damping(), name)
        removed = torch.zeros_like(dense[name], dtype=torch.bool)
        keep = to_matrix(m, result.masks[f"{name}.weight"], None)
        removed[:, : keep.shape[1]] = ~keep
        got = to_matrix(m, m.weight.detach(), None if m.bias is None else m.bias.detach())
        torch.testing.assert_close(got, sweep_update(dense[name], c.A, removed), rtol=1e-12, atol=1e-12)
        assert (got[removed] == 0).all()
        assert removed.any() or structure == "unstructured"  # the global threshold may spare a layer
        if m.bias is not None:
            assert not torch.equal(got[:, -1], dense[name][:, -1])
