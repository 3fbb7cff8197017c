"""collect_kfac (passes/curvature.py) against explicit computations on tiny models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgeon_fx.passes import curvature
from surgeon_fx.passes.curvature import KronFactors, collect_kfac, default_layers
from surgeon_fx.passes.kron import damped_cholesky, dense_fisher, kron_sum, nearest_kron

D = torch.float64


def ce_sum(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")


def weight_matrix_grad(layer: nn.Module) -> torch.Tensor:
    """A layer's weight gradient in (out, in') orientation, bias gradient as the last column."""
    gw = layer.weight.grad
    if type(layer).__name__ == "Conv1D":
        gw = gw.T
    gw = gw.reshape(gw.shape[0], -1)
    return gw if layer.bias is None else torch.cat([gw, layer.bias.grad[:, None]], dim=1)


def per_example_grads(model, layer, examples, loss_fn=ce_sum) -> torch.Tensor:
    """[N, out, in'] gradients of each example's summed loss, by plain autograd on the weights."""
    grads = []
    for ex in examples:
        model.zero_grad()
        loss_fn(model, ex).backward()
        grads.append(weight_matrix_grad(layer).clone())
    model.zero_grad(set_to_none=True)
    return torch.stack(grads)


@pytest.mark.parametrize("block", [256, 2])
def test_classic_factors_match_explicit_capture(block, monkeypatch):
    """block 2 exercises the lower-triangle blocked Gram accumulation (in' = 4, out = 2 and 4)."""
    monkeypatch.setattr(curvature, "GRAM_BLOCK", block)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 4)).to(D)
    batches = [(torch.randn(6, 3, dtype=D), torch.randint(0, 4, (6,))) for _ in range(3)]
    f = collect_kfac(model, batches, loss_fn=ce_sum, dtype=D)
    assert set(f) == {"0", "2"}
    rows_a, rows_g = [], []
    for x, y in batches:
        s = F.linear(x, model[0].weight, model[0].bias).detach().requires_grad_()
        loss = F.cross_entropy(model[2](torch.tanh(s)), y, reduction="sum")
        rows_a.append(torch.cat([x, torch.ones(6, 1, dtype=D)], 1))
        rows_g.append(torch.autograd.grad(loss, s)[0])
    a, g = torch.cat(rows_a), torch.cat(rows_g)
    assert f["0"].tokens == 18
    torch.testing.assert_close(f["0"].A, a.T @ a / 18)
    torch.testing.assert_close(f["0"].G, g.T @ g / 18)


def test_iad_kronecker_equals_true_fisher_when_a_and_g_independent():
    """Product design: every input a_i meets every output gradient c_j, so a and g are exactly independent
    under the empirical distribution and E[(g⊗a)(g⊗a)ᵀ] = E[ggᵀ] ⊗ E[aaᵀ] holds exactly."""
    torch.manual_seed(1)
    layer = nn.Linear(3, 2, bias=False).to(D)
    xs, cs = torch.randn(4, 3, dtype=D), torch.randn(5, 2, dtype=D)
    x = xs.repeat_interleave(5, 0)
    c = cs.repeat(4, 1)
    f = collect_kfac(layer, [(x, c)], layers=[""], loss_fn=lambda m, b: (m(b[0]) * b[1]).sum(), dtype=D)[""]
    true_fisher = dense_fisher(c[:, :, None] * x[:, None, :])  # [6, 6], per-token examples
    assert true_fisher.shape == (6, 6)
    torch.testing.assert_close(torch.kron(f.G, f.A), true_fisher)
    torch.testing.assert_close(torch.kron(f.G, f.A), torch.kron(cs.T @ cs / 5, xs.T @ xs / 4))


def _sequence_model_and_data(seed=2):
    """in=3 → out=2 layer applied per token, tokens mixed by a sum over positions before the classifier."""
    torch.manual_seed(seed)

    class SeqNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(3, 2), nn.Linear(2, 3)

        def forward(self, x):  # [B, P, 3] → [B, 3]
            return self.head(torch.tanh(self.fc(x)).sum(1))

    model = SeqNet().to(D)
    examples = [(torch.randn(1, 5, 3, dtype=D) + torch.tensor([1.0, -0.5, 0.0], dtype=D),
                 torch.randint(0, 3, (1,))) for _ in range(40)]
    return model, examples


def test_nearest_kfac_beats_classic_and_matches_power_iteration():
    model, examples = _sequence_model_and_data()
    grads = per_example_grads(model, model.fc, examples)  # [40, 2, 4]
    tokens = 40 * 5
    true_fisher = dense_fisher(grads, norm=tokens)  # [8, 8]
    classic = collect_kfac(model, examples, layers=["fc"], loss_fn=ce_sum, dtype=D)["fc"]
    near = collect_kfac(model, examples, layers=["fc"], loss_fn=ce_sum, dtype=D,
                        fisher_approx="nearest", power_iters=9)["fc"]
    assert near.tokens == classic.tokens == tokens
    ref = nearest_kron(grads, iters=4, tol=0.0, init=(classic.G, classic.A), norm=tokens)
    torch.testing.assert_close(torch.kron(near.G, near.A), kron_sum(ref))
    err = {"classic": (true_fisher - torch.kron(classic.G, classic.A)).norm()}
    for rank in (1, 2, 3):
        comps = nearest_kron(grads, rank=rank, iters=100, init=(classic.G, classic.A), norm=tokens)
        err[rank] = (true_fisher - kron_sum(comps)).norm()
    err["streamed"] = (true_fisher - torch.kron(near.G, near.A)).norm()
    assert err["streamed"] < err["classic"]
    assert err[1] <= err["streamed"] * (1 + 1e-9)
    assert err[3] < err[2] < err[1]


def test_sampled_fisher_gives_model_expectation_with_one_backward_per_sample():
    """For a softmax classifier E_y~p[g gᵀ] = diag(p) − p pᵀ; averaging the k losses before one backward would
    shrink the estimate about k-fold."""
    torch.manual_seed(3)
    model = nn.Linear(4, 3).to(D)
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    p = torch.softmax(model(x), -1).detach()
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    sampled = collect_kfac(model, [(x, y)], layers=[""], loss_fn=ce_sum, fisher="sampled", samples=400, dtype=D)[""]
    assert (sampled.G - expected).norm() < 0.1 * expected.norm()
    empirical = collect_kfac(model, [(x, y)], layers=[""], loss_fn=ce_sum, dtype=D)[""]
    r = p - F.one_hot(y, 3).to(D)
    torch.testing.assert_close(empirical.G, r.T @ r / 8)
    assert sampled.tokens == empirical.tokens == 8


def test_conv2d_factors_match_unfold_and_weight_gradients():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).to(D)
    x, y = torch.randn(5, 2, 6, 6, dtype=D), torch.randint(0, 4, (5,))
    f = collect_kfac(model, [(x, y)], layers=["0"], loss_fn=ce_sum, dtype=D)["0"]
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)  # [5·9, 2·3·3]
    a = torch.cat([cols, torch.ones(45, 1, dtype=D)], 1)
    s = model[0](x).detach().requires_grad_()
    g = torch.autograd.grad(ce_sum(lambda t: model[1:](t), (s, y)), s)[0].permute(0, 2, 3, 1).reshape(-1, 3)
    assert f.A.shape == (19, 19) and f.G.shape == (3, 3) and f.tokens == 45
    torch.testing.assert_close(f.A, a.T @ a / 45)
    torch.testing.assert_close(f.G, g.T @ g / 45)
    # the per-example gradient built from (a, g) is the true weight gradient: one power step is exact
    examples = [(x[i:i + 1], y[i:i + 1]) for i in range(5)]
    grads = per_example_grads(model, model[0], examples)
    near = collect_kfac(model, examples, layers=["0"], loss_fn=ce_sum, dtype=D, fisher_approx="nearest",
                        power_iters=1)["0"]
    ref = nearest_kron(grads, iters=0, init=(f.G, f.A), norm=45)
    torch.testing.assert_close(near.A, ref[0][1])


def test_hf_conv1d_reports_out_in_orientation():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    conv = Conv1D(2, 3).to(D)  # weight stored [in=3, out=2]
    lin = nn.Linear(3, 2).to(D)
    with torch.no_grad():
        conv.weight.normal_()
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    examples = [(torch.randn(1, 4, 3, dtype=D), torch.randint(0, 2, (1, 4))) for _ in range(6)]
    fc = collect_kfac(conv, examples, layers=[""], loss_fn=ce_sum, dtype=D, fisher_approx="nearest",
                      power_iters=1)[""]
    fl = collect_kfac(lin, examples, layers=[""], loss_fn=ce_sum, dtype=D, fisher_approx="nearest",
                      power_iters=1)[""]
    assert fc.A.shape == (4, 4) and fc.G.shape == (2, 2)
    torch.testing.assert_close(fc.A, fl.A)
    torch.testing.assert_close(fc.G, fl.G)
    grads = per_example_grads(conv, conv, examples)
    assert grads.shape == (6, 2, 4)
    torch.testing.assert_close(grads, per_example_grads(lin, lin, examples))


def test_rank_deficient_layer_escalates_damping():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2)).to(torch.float32)
    x = torch.randn(16, 4)
    x[:, 2:] = 0.0  # two dead input coordinates
    f = collect_kfac(model, [(x, torch.randint(0, 2, (16,)))], layers=["0"], loss_fn=ce_sum)["0"]
    assert int(torch.linalg.cholesky_ex(f.A).info) != 0
    L, damp = damped_cholesky(f.A, 0.0)
    assert damp > 0.0 and torch.isfinite(L).all()


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_tiny_llama_factors_are_symmetric_psd_and_model_is_untouched(fisher):
    model = _tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    windows = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    f = collect_kfac(model, windows, fisher=fisher, samples=2, batch_size=2)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert set(f) == set(linears) and len(f) == 14
    for name, fac in f.items():
        assert isinstance(fac, KronFactors) and fac.tokens == 36
        out_dim, in_dim = linears[name].weight.shape
        assert fac.A.shape == (in_dim, in_dim) and fac.G.shape == (out_dim, out_dim), name
        assert fac.A.dtype == fac.G.dtype == torch.float32
        for M in (fac.A, fac.G):
            torch.testing.assert_close(M, M.T)
            assert torch.linalg.eigvalsh(M.double()).min() >= -1e-6 * M.abs().max(), name
        assert fac.G.abs().max() > 0, name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_tiny_llama_nearest_is_finite_and_lm_head_excluded_when_untied():
    model = _tiny_llama(seed=1)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert "lm_head" not in default_layers(model)
    windows = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"]
    f = collect_kfac(model, windows, layers=names, fisher_approx="nearest", power_iters=2, offload=True)
    assert set(f) == set(names)
    for fac in f.values():
        assert torch.isfinite(fac.A).all() and torch.isfinite(fac.G).all() and fac.A.device.type == "cpu"
    with pytest.raises(ValueError, match="'model.norm' is not"):
        collect_kfac(model, windows, layers=["model.norm"])
