"""Closed-form costs against the explicitly solved constrained quadratic problem (float64)."""
import pytest
import torch

from surgeon_fx.passes.baselines import LayerCurvature
from surgeon_fx.passes.blocks import UnitBlocks
from surgeon_fx.passes.costs import col_block_costs, element_costs, row_block_costs, unit_costs
from surgeon_fx.passes.update import col_update, row_update

from tests.kkt import F64, kkt, spd


@pytest.mark.parametrize("seed", range(4))
def test_element_cost_is_exact_single_weight_obs(seed):
    gen = torch.Generator().manual_seed(seed)
    out, inn = 5, 7
    W, G, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(out, gen), spd(inn, gen)
    F = torch.kron(G, A)
    costs = element_costs(W, torch.linalg.inv(G).diagonal(), torch.linalg.inv(A).diagonal())
    for i, j in [(0, 0), (2, 5), (4, 6)]:
        _, loss = kkt(F, W.reshape(-1), torch.tensor([i * inn + j]))
        assert costs[i, j] == pytest.approx(float(loss), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_row_block_cost_and_update_match_kkt(seed):
    gen = torch.Generator().manual_seed(seed)
    out, inn = 6, 5
    W, G, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(out, gen), spd(inn, gen)
    F, Ginv = torch.kron(G, A), torch.linalg.inv(G)
    rows = torch.tensor([1, 4])
    idx = (rows[:, None] * inn + torch.arange(inn)).reshape(-1)
    x, loss = kkt(F, W.reshape(-1), idx)
    dW = row_update(W, Ginv, rows)
    torch.testing.assert_close(dW.reshape(-1), x, rtol=1e-9, atol=1e-10)
    cost = row_block_costs(W, A, Ginv, rows[None])
    assert float(cost) == pytest.approx(float(loss), rel=1e-9)
    measured = 0.5 * dW.reshape(-1) @ F @ dW.reshape(-1)
    assert float(cost) == pytest.approx(float(measured), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_col_block_cost_and_update_match_kkt(seed):
    gen = torch.Generator().manual_seed(seed)
    out, inn = 4, 8
    W, G, A = torch.randn(out, inn, generator=gen, dtype=F64), spd(out, gen), spd(inn, gen)
    F, Ainv = torch.kron(G, A), torch.linalg.inv(A)
    cols = torch.tensor([0, 3, 6])
    idx = (torch.arange(out)[:, None] * inn + cols[None]).reshape(-1)
    x, loss = kkt(F, W.reshape(-1), idx)
    dW = col_update(W, Ainv, cols)
    torch.testing.assert_close(dW.reshape(-1), x, rtol=1e-9, atol=1e-10)
    cost = col_block_costs(W, G, Ainv, cols[None])
    assert float(cost) == pytest.approx(float(loss), rel=1e-9)


def test_batched_blocks_equal_one_by_one():
    gen = torch.Generator().manual_seed(0)
    W, G, A = torch.randn(8, 6, generator=gen, dtype=F64), spd(8, gen), spd(6, gen)
    Ginv, Ainv = torch.linalg.inv(G), torch.linalg.inv(A)
    rb = torch.tensor([[0, 1], [2, 3], [6, 7]])
    cb = torch.tensor([[0, 5], [1, 2]])
    batched_r, batched_c = row_block_costs(W, A, Ginv, rb), col_block_costs(W, G, Ainv, cb)
    for u in range(3):
        assert batched_r[u] == pytest.approx(float(row_block_costs(W, A, Ginv, rb[u:u + 1])), rel=1e-12)
    for u in range(2):
        assert batched_c[u] == pytest.approx(float(col_block_costs(W, G, Ainv, cb[u:u + 1])), rel=1e-12)


def test_unit_cost_sums_its_blocks_over_layers():
    gen = torch.Generator().manual_seed(1)
    up = (torch.randn(6, 4, generator=gen, dtype=F64), spd(6, gen), spd(4, gen))
    down = (torch.randn(4, 6, generator=gen, dtype=F64), spd(4, gen), spd(6, gen))
    layers = {}
    for name, (W, G, A) in {"up": up, "down": down}.items():
        layers[name] = (W, LayerCurvature(A, torch.linalg.inv(A), G, torch.linalg.inv(G), 0.0, 0.0))
    units = [UnitBlocks({"up": torch.tensor([n])}, {"down": torch.tensor([n])}, ()) for n in range(6)]
    got = unit_costs(units, layers)
    for n in range(6):
        expect = row_block_costs(up[0], up[2], layers["up"][1].G_inv, torch.tensor([[n]])) + \
            col_block_costs(down[0], down[1], layers["down"][1].A_inv, torch.tensor([[n]]))
        assert got[n] == pytest.approx(float(expect), rel=1e-12)
    assert (got > 0).all()
