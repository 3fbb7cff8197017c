import math

import pytest
import torch
from torch import nn

from surgeon_fx.data import eval_windows
from surgeon_fx.evaluate import perplexity
from surgeon_fx.hf import tiny_llama

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."


class Uniform(nn.Module):
    """Logits all zero: p(token) = 1 / V for every position."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


class Bigram(nn.Module):
    """p(x_t | x_<t) = softmax(table[x_{t-1}])."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, ids):
        return self.table[ids]


@pytest.mark.parametrize("vocab", [2, 50, 128])
def test_uniform_model_has_perplexity_vocab(vocab):
    windows = torch.randint(0, vocab, (3, 17))
    result = perplexity(Uniform(vocab), windows)
    assert result.ppl == pytest.approx(vocab, rel=1e-6)
    assert result.nll == pytest.approx(math.log(vocab), rel=1e-6)
    assert (result.tokens, result.windows) == (3 * 16, 3)


def test_windowed_perplexity_matches_direct_computation():
    ids = torch.tensor([ord(c) for c in TEXT])
    model = Bigram(128)
    length = 10
    windows = eval_windows(ids, length)
    logp = torch.log_softmax(model.table, dim=-1)
    direct = []  # each window predicts its own tokens 1..L-1; its first token is never predicted
    for w in range(len(ids) // length):
        chunk = ids[w * length : (w + 1) * length]
        direct += [-logp[chunk[t - 1], chunk[t]].item() for t in range(1, length)]
    expected = sum(direct) / len(direct)
    for batch_size in (1, 3, 100):
        result = perplexity(model, windows, batch_size=batch_size)
        assert result.nll == pytest.approx(expected, rel=1e-5)
        assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)
        assert result.tokens == len(direct)


def test_hf_model_output_and_no_grad():
    model = tiny_llama()
    windows = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), windows[:, 1:].reshape(-1))
    assert result.nll == pytest.approx(expected.item(), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_rejects_windows_of_one_token():
    with pytest.raises(ValueError):
        perplexity(Uniform(4), torch.zeros(2, 1, dtype=torch.long))


def test_bfloat16_autocast_is_close_and_off_by_default():
    model = tiny_llama()
    windows = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    full = perplexity(model, windows, progress=False)
    bf16 = perplexity(model, windows, progress=False, autocast=torch.bfloat16)
    assert bf16.ppl != full.ppl and bf16.ppl == pytest.approx(full.ppl, rel=0.02)
    assert next(model.parameters()).dtype == torch.float32  # the weights stay float32
