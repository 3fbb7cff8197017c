import pytest
import torch

from surgeon_fx.passes.sequential import InputStats
from surgeon_fx.passes.wanda import wanda, wanda_prune_layer, wanda_scores
from surgeon_fx.hf import tiny_llama, tiny_opt
from tests.archs import tiny_gemma


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_unstructured_prunes_exact_count_per_row(sparsity):
    W = torch.randn(12, 40, generator=_gen(0))
    norms = torch.rand(40, generator=_gen(1)) + 0.1
    W_new, keep = wanda_prune_layer(W, norms, sparsity=sparsity)
    assert ((~keep).sum(1) == int(sparsity * 40)).all()
    assert (W_new[~keep] == 0).all() and torch.equal(W_new[keep], W[keep])  # no weight update


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 2)])
def test_nm_has_exactly_n_nonzeros_per_group(n, m):
    W = torch.randn(9, 32, generator=_gen(2))
    norms = torch.rand(32, generator=_gen(3)) + 0.1
    W_new, keep = wanda_prune_layer(W, norms, n_m=(n, m))
    assert ((W_new != 0).reshape(9, 32 // m, m).sum(-1) == n).all()
    assert ((keep).reshape(9, 32 // m, m).sum(-1) == n).all()


def test_score_weights_magnitude_by_input_norm():
    # Equal weights: the inputs with the largest activation norms win; magnitude alone cannot tell.
    W = torch.tensor([[1.0, -1.0, 1.0, -1.0], [5.0, 0.1, -0.5, 1.0]])
    norms = torch.tensor([0.1, 3.0, 2.0, 0.2])
    assert torch.equal(wanda_scores(W, norms), W.abs() * norms)
    _, keep = wanda_prune_layer(W, norms, sparsity=0.5)
    assert keep.tolist() == [[False, True, True, False], [True, False, True, False]]  # magnitude: 0, 3


def test_input_stats_column_norms():
    x = torch.randn(3, 5, 8, generator=_gen(4))
    for full in (False, True):
        stats = InputStats(full)
        stats.add(x[:2])
        stats.add(x[2:])
        assert stats.n == 15
        torch.testing.assert_close(stats.column_norms(), x.reshape(-1, 8).norm(dim=0))


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt, tiny_gemma], ids=["llama", "opt", "gemma"])
def test_model_level_wanda_row_counts(build):
    model = build()
    windows = torch.randint(0, 128, (3, 16), generator=_gen(5))
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    masks = wanda(model, windows, sparsity=0.5)
    assert masks and all("layers" in name for name in masks)
    for name, keep in masks.items():
        W = model.get_submodule(name).weight
        assert ((W == 0).sum(1) == W.shape[1] // 2).all(), name
        assert torch.equal(W[keep], before[name][keep])
    lm_head = [n for n in before if n not in masks]
    assert lm_head and all(torch.equal(model.get_submodule(n).weight, before[n]) for n in lm_head)


def test_model_level_wanda_nm():
    model = tiny_llama()
    masks = wanda(model, torch.randint(0, 128, (2, 16), generator=_gen(6)), n_m=(2, 4))
    for name in masks:
        W = model.get_submodule(name).weight
        assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) == 2).all(), name
