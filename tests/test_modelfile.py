"""The model file contract: what is required, what is optional, and the one-line errors."""
import textwrap

import pytest
import torch

from surgeon_fx.modelfile import ModelFileError, from_hf_folder, load_model_file

PLAIN = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
"""


def write(tmp_path, body, name="model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_missing_build(tmp_path):
    with pytest.raises(ModelFileError, match=r"^model.py does not define build\(\)$"):
        load_model_file(write(tmp_path, "x = 1\n"))


def test_missing_file_and_not_python(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model_file(tmp_path / "nope.py")
    with pytest.raises(ModelFileError, match="not a Python file"):
        load_model_file(write(tmp_path, PLAIN, "model.txt"))


def test_import_error_is_one_line(tmp_path):
    with pytest.raises(ModelFileError, match="model.py failed to import: ZeroDivisionError: division by zero"):
        load_model_file(write(tmp_path, "x = 1 / 0\n"))


def test_build_must_return_a_module(tmp_path):
    mf = load_model_file(write(tmp_path, "def build():\n    return 3\n"))
    with pytest.raises(ModelFileError, match=r"build\(\) returned int, not a torch.nn.Module"):
        mf.build()


def test_build_failure_names_the_function(tmp_path):
    mf = load_model_file(write(tmp_path, "def build():\n    raise RuntimeError('no weights')\n"))
    with pytest.raises(ModelFileError, match=r"model.py: build\(\) failed: RuntimeError: no weights"):
        mf.build()


def test_example_inputs_required_for_plain_modules(tmp_path):
    mf = load_model_file(write(tmp_path, PLAIN))
    assert mf.path.is_absolute() and len(mf.sha256) == 64 and mf.is_lm
    with pytest.raises(ModelFileError, match=r"does not define example_inputs\(\)"):
        mf.example_inputs(mf.build())


def test_example_inputs_single_tensor_becomes_tuple(tmp_path):
    mf = load_model_file(write(tmp_path, PLAIN + "\ndef example_inputs():\n    return torch.randn(2, 4)\n"))
    (x,) = mf.example_inputs(mf.build())
    assert x.shape == (2, 4)


def test_hf_causal_lm_gets_token_ids(tmp_path):
    mf = load_model_file(write(tmp_path, "from surgeon_fx.hf import tiny_llama\n\ndef build():\n"
                                         "    return tiny_llama()\n"))
    (ids,) = mf.example_inputs(mf.build())
    assert ids.dtype == torch.long and ids.shape == (1, 16)


CALIB = PLAIN + """
def calibration(n, length, seed):
    return torch.randint(0, 5, (n - SHORT_N, length - SHORT_L))
"""


@pytest.mark.parametrize("short_n,short_l,message", [(1, 0, "returned 3 windows, fewer than the 4"),
                                                     (0, 2, "windows of 6 tokens, shorter than the 8")])
def test_calibration_too_little(tmp_path, short_n, short_l, message):
    body = CALIB.replace("SHORT_N", str(short_n)).replace("SHORT_L", str(short_l))
    mf = load_model_file(write(tmp_path, body))
    with pytest.raises(ModelFileError, match=message):
        mf.calibration(4, 8, 0)


def test_calibration_windows_checked_and_kept(tmp_path):
    mf = load_model_file(write(tmp_path, CALIB.replace("SHORT_N", "0").replace("SHORT_L", "0")))
    assert mf.calibration(4, 8, 0).shape == (4, 8)


def test_calibration_must_be_token_ids(tmp_path):
    mf = load_model_file(write(tmp_path, PLAIN + "\ndef calibration(n, length, seed):\n"
                                                 "    return torch.randn(n, length)\n"))
    with pytest.raises(ModelFileError, match="integer tensor"):
        mf.calibration(2, 4, 0)


def test_calibration_signature_and_missing(tmp_path):
    with pytest.raises(ModelFileError, match=r"calibration must take \(n, length, seed\)"):
        load_model_file(write(tmp_path, PLAIN + "\ndef calibration(n):\n    return None\n"))
    mf = load_model_file(write(tmp_path, PLAIN))
    with pytest.raises(ModelFileError, match="no calibration data"):
        mf.calibration(2, 4, 0)


def test_loss_marks_batches(tmp_path):
    body = PLAIN + """
def calibration(n, length, seed):
    return [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(n)]

def loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

def evaluation():
    return [(torch.randn(2, 4), torch.tensor([0, 1]))]
"""
    mf = load_model_file(write(tmp_path, body))
    assert not mf.is_lm
    batches = mf.calibration(3, 99, 0)
    assert len(batches) == 3
    assert mf.loss(mf.build(), batches[0]).item() > 0
    assert len(mf.evaluation()) == 1


def test_tokenizer_missing_names_the_option(tmp_path):
    mf = load_model_file(write(tmp_path, PLAIN))
    assert mf.evaluation() is None
    with pytest.raises(ModelFileError, match="--calib-file"):
        mf.tokenizer()


def test_hf_folder(tmp_path):
    from surgeon_fx.hf import tiny_llama

    with pytest.raises(ModelFileError, match="no config.json"):
        from_hf_folder(tmp_path / "missing")
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    mf = from_hf_folder(tmp_path / "llama")
    loaded = mf.build()
    ids = torch.arange(10)[None]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ModelFileError, match="the folder has no tokenizer"):
        mf.tokenizer()
