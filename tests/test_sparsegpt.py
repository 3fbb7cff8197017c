import pytest
import torch

from surgeon_fx.passes.nm import topk_mask
from surgeon_fx.passes.sequential import capture_block_inputs, find_blocks, prune_sequential
from surgeon_fx.passes.sparsegpt import sparsegpt, sparsegpt_prune_layer
from surgeon_fx.hf import tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _low_rank_inputs(dim, rank, n=512, seed=0):
    """X [dim, n] spanning a random ``rank``-dimensional subspace; H = 2 X Xᵀ / n."""
    g = _gen(seed)
    X = torch.randn(dim, rank, generator=g) @ torch.randn(rank, n, generator=g)
    Xd = X.double()  # a float32 Gram matrix of rank 2 is not positive semi-definite to 1e-6
    return X, 2 * Xd @ Xd.T / n


def _rel_err(W_new, W, X):
    return (((W_new - W) @ X).norm() / (W @ X).norm()).item()


@pytest.mark.parametrize("rank, kwargs", [(4, {"sparsity": 0.5}), (2, {"n_m": (2, 4)})])
def test_recovers_outputs_when_inputs_are_low_rank(rank, kwargs):
    # Inputs in a low-dimensional subspace: pruned columns can be compensated exactly by the kept ones.
    W = torch.randn(16, 32, generator=_gen(1))
    X, H = _low_rank_inputs(32, rank)
    W_new, keep = sparsegpt_prune_layer(W, H, percdamp=1e-6, **kwargs)
    assert keep.float().mean() == 0.5 and (W_new[~keep] == 0).all()
    assert _rel_err(W_new, W, X) < 1e-4
    # Zeroing the same number of weights without compensation is far off the target.
    assert _rel_err(W * topk_mask(W.abs(), 0.5), W, X) > 0.1
    assert _rel_err(W * keep, W, X) > 0.1


def test_beats_magnitude_and_mask_only_on_correlated_inputs():
    g = _gen(2)
    W = torch.randn(24, 64, generator=g)
    X = torch.randn(64, 64, generator=g) @ torch.randn(64, 1024, generator=g)
    H = 2 * X @ X.T / X.shape[1]
    W_new, keep = sparsegpt_prune_layer(W, H, sparsity=0.5, blocksize=16)
    err = _rel_err(W_new, W, X)
    assert err < 0.8 * _rel_err(W * topk_mask(W.abs(), 0.5), W, X)
    assert err < _rel_err(W * keep, W, X)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_output_has_exactly_n_nonzeros_per_m_block(n, m):
    g = _gen(3)
    W = torch.randn(20, 64, generator=g)
    X = torch.randn(64, 300, generator=g)
    W_new, keep = sparsegpt_prune_layer(W, 2 * X @ X.T / 300, n_m=(n, m), blocksize=32)
    assert ((W_new != 0).reshape(20, 64 // m, m).sum(-1) == n).all()
    assert torch.equal(W_new != 0, keep)


def test_unstructured_prunes_exact_fraction_of_every_column_block():
    g = _gen(4)
    W = torch.randn(10, 256, generator=g)
    X = torch.randn(256, 400, generator=g)
    W_new, keep = sparsegpt_prune_layer(W, 2 * X @ X.T / 400, sparsity=0.3, blocksize=128)
    for block in keep.split(128, dim=1):
        assert (~block).sum() == int(0.3 * block.numel())
    assert (W_new[~keep] == 0).all() and (W_new[keep] != 0).all()


def test_lazy_block_updates_match_column_by_column():
    # N:M mask choice does not depend on the block size, so all block sizes must agree.
    g = _gen(5)
    W = torch.randn(12, 64, generator=g)
    X = torch.randn(64, 16, generator=g) @ torch.randn(16, 500, generator=g) + 0.1 * torch.randn(64, 500, generator=g)
    H = 2 * X @ X.T / 500
    ref, ref_keep = sparsegpt_prune_layer(W, H, n_m=(2, 4), blocksize=4)
    for blocksize in (8, 32, 128):
        out, keep = sparsegpt_prune_layer(W, H, n_m=(2, 4), blocksize=blocksize)
        assert torch.equal(keep, ref_keep)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_dead_inputs_get_zero_weights_and_no_nans():
    g = _gen(6)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(16, 100, generator=g)
    X[3] = 0
    W_new, _ = sparsegpt_prune_layer(W, 2 * X @ X.T / 100, sparsity=0.25)
    assert torch.isfinite(W_new).all() and (W_new[:, 3] == 0).all()


def test_argument_checks():
    with pytest.raises(ValueError):
        sparsegpt_prune_layer(torch.randn(2, 8), torch.eye(8))
    with pytest.raises(ValueError):
        sparsegpt_prune_layer(torch.randn(2, 8), torch.eye(8), sparsity=0.5, n_m=(2, 4))
    with pytest.raises(ValueError):
        sparsegpt_prune_layer(torch.randn(2, 12), torch.eye(12), n_m=(2, 4), blocksize=6)


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt, tiny_gpt2, tiny_qwen2], ids=["llama", "opt", "gpt2", "qwen2"])
def test_captured_block_inputs_replay_the_model(build):
    # The first block's captured hidden states and kwargs (mask, rotary embeddings) reproduce the model.
    model = build()
    windows = torch.randint(0, 128, (3, 16), generator=_gen(7))
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], windows, batch_size=2)
    assert [b.hidden.shape[0] for b in inputs] == [2, 1]
    with torch.no_grad():
        states = model(windows, output_hidden_states=True).hidden_states
        torch.testing.assert_close(torch.cat([b.hidden for b in inputs]), states[0])
        torch.testing.assert_close(torch.cat([b.call(blocks[0]) for b in inputs]), states[1])


def test_equal_extra_arguments_are_stored_once():
    model = tiny_llama()
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], torch.randint(0, 128, (3, 16), generator=_gen(11)))
    assert "position_embeddings" in inputs[0].kwargs
    assert inputs[1].kwargs is inputs[0].kwargs and inputs[2].kwargs is inputs[0].kwargs
    assert not torch.equal(inputs[0].hidden, inputs[1].hidden)


def test_sequential_calibrates_on_pruned_outputs():
    # Block 1 is calibrated on the outputs of the already pruned block 0, not on dense ones.
    model, dense = tiny_llama(), tiny_llama()
    windows = torch.randint(0, 128, (4, 16), generator=_gen(8))
    name = "model.layers.1.self_attn.q_proj"  # its input does not depend on block 1's own pruning
    used = []

    def prune(W, stats):
        used.append(stats.hessian())
        return sparsegpt_prune_layer(W, used[-1], sparsity=0.5)

    masks = prune_sequential(model, windows, prune, full_gram=True)
    used_h = used[list(masks).index(name)]

    def hessian_of(m):
        xs = []
        handle = m.get_submodule(name).register_forward_hook(lambda _m, a, _o: xs.append(a[0].reshape(-1, 64)))
        with torch.no_grad():
            m(windows)
        handle.remove()
        x = torch.cat(xs)
        return 2 * x.T @ x / x.shape[0]

    pruned_h, dense_h = hessian_of(model), hessian_of(dense)
    assert (used_h - pruned_h).norm() < 1e-4 * pruned_h.norm()
    assert (used_h - dense_h).norm() > 1e-2 * dense_h.norm()


def test_model_level_sparsegpt_prunes_block_linears_only():
    model = tiny_llama()
    embed = model.model.embed_tokens.weight.clone()
    windows = torch.randint(0, 128, (4, 16), generator=_gen(9))
    masks = sparsegpt(model, windows, sparsity=0.5, blocksize=32)
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down per block
    for name, keep in masks.items():
        W = model.get_submodule(name).weight
        assert keep.shape == W.shape and (W[~keep] == 0).all()
        assert abs(keep.float().mean().item() - 0.5) < 0.02
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_model_level_nm_on_gpt2_conv1d():
    model = tiny_gpt2()
    windows = torch.randint(0, 128, (2, 16), generator=_gen(10))
    masks = sparsegpt(model, windows, n_m=(2, 4))
    assert "transformer.h.0.attn.c_attn" in masks
    for name, keep in masks.items():
        W = model.get_submodule(name).weight.T  # Conv1D stores [in, out]
        nz = (W != 0).reshape(W.shape[0], -1, 4).sum(-1)
        assert (nz == 2).all(), name


def test_entries_removed_earlier_stay_removed():
    # A multi-shot caller's constraint: entries pruned by an earlier shot are pruned again, with n of m kept.
    g = _gen(4)
    W = torch.randn(12, 32, generator=g)
    X = torch.randn(32, 200, generator=g)
    before = torch.zeros(12, 32, dtype=torch.bool)
    before[:, ::4] = True  # one entry of every group of 4 gone already (a 3:4 first shot)
    _, keep = sparsegpt_prune_layer(W, 2 * X @ X.T / 200, n_m=(2, 4), blocksize=16, removed=before)
    assert not keep[before].any()
    assert (keep.reshape(12, 8, 4).sum(-1) == 2).all()
    _, free = sparsegpt_prune_layer(W, 2 * X @ X.T / 200, n_m=(2, 4), blocksize=16)
    assert free[before].any()  # without the constraint some of them would be kept
