import pytest
import torch

from surgeon_fx.data import (calibration_starts, calibration_windows, eval_windows, read_text, tokenize,
                             validation_windows)


class CharTokenizer:
    """Maps every character to its code point; returns HF-style {"input_ids": [1, N]}."""

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}


def test_read_text_local_file_is_verbatim(tmp_path):
    text = " = Title = \n\n Some text , with @-@ odd spacing \n"
    path = tmp_path / "corpus.raw"
    path.write_text(text, encoding="utf-8")
    assert read_text(path) == text
    assert read_text(str(path)) == text


def test_read_text_hf_without_datasets_is_clear():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"):
            read_text("hf://wikitext/wikitext-2-raw-v1/test")
    with pytest.raises(ValueError, match="hf://"):
        read_text("hf://wikitext/test")


def test_tokenize_whole_text_once():
    ids = tokenize(CharTokenizer(), "abc")
    assert ids.dtype == torch.long and ids.tolist() == [97, 98, 99]


def test_eval_windows_non_overlapping_and_limit():
    ids = torch.arange(23)
    w = eval_windows(ids, 5)
    assert w.shape == (4, 5) and w.dtype == torch.long
    assert torch.equal(w.reshape(-1), torch.arange(20))
    assert torch.equal(eval_windows(ids, 5, limit=2), w[:2])


def test_eval_windows_too_short():
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(torch.arange(4), 5)
    with pytest.raises(ValueError, match="asked for 5"):
        eval_windows(torch.arange(23), 5, limit=5)


def test_calibration_windows_seeded_and_contiguous():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 16, 32, seed=3)
    b = calibration_windows(ids, 16, 32, seed=3)
    c = calibration_windows(ids, 16, 32, seed=4)
    assert a.shape == (16, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # each window is a contiguous slice
    assert a.min() >= 0 and a.max() < 1000


def test_calibration_windows_can_start_anywhere_including_the_last_start():
    ids = torch.arange(6)
    starts = calibration_windows(ids, 200, 5, seed=0)[:, 0]
    assert set(starts.tolist()) == {0, 1}


@pytest.mark.parametrize("n_ids, length", [(1000, 10), (273868, 512)])
def test_more_calibration_windows_append_to_fewer(n_ids, length):
    """The 64-window set holds the 32-window set first, so validation windows that avoid the 64 avoid the 32
    too (bench/surgeon_ablation.py --valid-avoid compares the two sizes on such windows)."""
    assert torch.equal(calibration_starts(n_ids, 64, length, seed=3)[:32], calibration_starts(n_ids, 32, length, seed=3))


def test_calibration_windows_too_short():
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(torch.arange(4), 2, 5, seed=0)


@pytest.mark.parametrize("calib_n, calib_length, length, seed", [(8, 50, 40, 0), (32, 20, 64, 3), (3, 300, 100, 1)])
def test_validation_windows_share_no_token_with_calibration(calib_n, calib_length, length, seed):
    ids = torch.arange(2000)  # token id = position, so windows say where they come from
    calib = calibration_windows(ids, calib_n, calib_length, seed)
    val = validation_windows(ids, length, calib_n, calib_length, seed)
    assert val.shape[1] == length and val.shape[0] >= 1
    used = set(calib.flatten().tolist())
    assert not used & set(val.flatten().tolist())  # disjoint from calibration
    assert len(set(val.flatten().tolist())) == val.numel()  # and from each other
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + length)) for w in val)  # contiguous text
    # greedy: no free stretch of `length` tokens before the last window is left unused
    free = sorted(set(range(int(val[-1, 0]))) - used - set(val.flatten().tolist()))
    longest, current, prev = 0, 0, None
    for t in free:
        current = current + 1 if prev is not None and t == prev + 1 else 1
        longest, prev = max(longest, current), t
    assert longest < length


def test_validation_windows_limit_and_errors():
    ids = torch.arange(1000)
    starts = calibration_starts(1000, 4, 100, seed=0)
    assert torch.equal(calibration_windows(ids, 4, 100, 0)[:, 0], starts)
    assert validation_windows(ids, 50, 4, 100, limit=3).shape == (3, 50)
    with pytest.raises(ValueError, match="avoids"):
        validation_windows(ids, 1000, 4, 100)
