"""Every bad input of issue 16 through the command line: one line on stderr, exit 2, nothing written.

Each case is (command-line arguments, text the error line must contain).  `{tmp}` in an argument is the test's
folder; model files named `*.py` there are written from `MODEL_FILES` first.  The output folder is always
`{tmp}/run/o`: afterwards `{tmp}/run` must hold nothing (no output, no ``o.work``, no ``.o.tmp-*``, no lock).
"""
import os
import re
import textwrap
from pathlib import Path

import pytest

from surgeon_fx.cli import main

MODELS = Path(__file__).resolve().parents[1] / "models"
LLAMA = str(MODELS / "tiny_llama.py")
QUICK = ["--calib-windows", "2", "--calib-length", "16", "--shots", "1", "--eval-windows", "1"]

MLP = """
import torch
from torch import nn
import torch.nn.functional as F

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

def example_inputs():
    return (torch.randn(2, 8),)

def calibration(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]

def loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")
"""


def variant(**replace: str) -> str:
    """MLP with some of its functions replaced (name -> new source of that function)."""
    source = MLP
    for name, new in replace.items():
        start = source.index(f"def {name}(")
        end = source.find("\ndef ", start + 1)
        source = source[:start] + textwrap.dedent(new).strip() + "\n" + (source[end:] if end > 0 else "")
    return source


LM_IDS = """
from surgeon_fx.hf import tiny_llama

def build():
    return tiny_llama()

def calibration(n, length, seed):
    import torch
    return torch.full((n, length), IDS, dtype=torch.long)
"""

MODEL_FILES = {
    "short_inputs.py": variant(example_inputs="def example_inputs():\n    return (torch.randn(2, 5),)"),
    "two_inputs.py": variant(example_inputs="def example_inputs():\n    return (torch.randn(2, 8), torch.randn(2, 8))"),
    "nan.py": variant(build="""
        def build():
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
            with torch.no_grad():
                model[2].weight[1, 3] = float("nan")
            return model"""),
    "inf.py": variant(build="""
        def build():
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
            with torch.no_grad():
                model[0].bias[0] = float("inf")
            return model"""),
    "loss_vector.py": variant(loss="""
        def loss(model, batch):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="none")"""),
    "loss_float.py": variant(loss="""
        def loss(model, batch):
            return float(F.cross_entropy(model(batch[0]), batch[1]))"""),
    "calib_shape.py": variant(calibration="""
        def calibration(n, length, seed):
            return [(torch.randn(4, 5), torch.zeros(4, dtype=torch.long)) for _ in range(n)]"""),
    "calib_dtype.py": variant(calibration="""
        def calibration(n, length, seed):
            return [(torch.ones(4, 8, dtype=torch.long), torch.zeros(4, dtype=torch.long)) for _ in range(n)]"""),
    "calib_type.py": variant(calibration="""
        def calibration(n, length, seed):
            return ["not a batch"] * n"""),
    "ids_high.py": LM_IDS.replace("IDS", "128"),
    "ids_negative.py": LM_IDS.replace("IDS", "-1"),
    "branchy.py": variant(build="""
        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

            def forward(self, x):
                h = self.a(x)
                if h.sum() > 0:
                    h = h * 2
                return self.b(h)

        def build():
            return Branchy()"""),
}

OTHER_FILES = {  # name -> bytes
    "empty.txt": b"",
    "latin1.toml": 'target = 0.5 # caf\xe9\n'.encode("latin-1"),
    "neg_damp.toml": b"damp_a = -0.1\n",
    "nan_damp.toml": b"damp_a = nan\n",
    "notes.txt": b"someone's notes\n",
}

CASES = {  # id: (arguments, text of the error line)
    "example inputs of the wrong shape": (["{tmp}/short_inputs.py"], "the model fails on example_inputs()"),
    "example inputs of the wrong shape, unstructured": (
        ["{tmp}/short_inputs.py", "--structure", "unstructured"], "the model fails on example_inputs()"),
    "example inputs of the wrong arity": (["{tmp}/two_inputs.py"], "the model fails on example_inputs()"),
    "NaN weights": (["{tmp}/nan.py", "--method", "magnitude", "--structure", "unstructured"],
                    "non-finite weights: 2.weight holds NaN"),
    "inf weights": (["{tmp}/inf.py"], "non-finite weights: 0.bias holds inf"),
    "loss returns a vector": (["{tmp}/loss_vector.py"], "must return a scalar floating-point tensor"),
    "loss returns a float": (["{tmp}/loss_float.py"], "must return a scalar floating-point tensor (summed over "
                                                      "the batch), got float"),
    "calibration batches of the wrong shape": (["{tmp}/calib_shape.py"], "loss() failed"),
    "calibration batches of the wrong dtype": (["{tmp}/calib_dtype.py"], "loss() failed"),
    "calibration batches of the wrong type": (["{tmp}/calib_type.py"], "loss() failed"),
    "token ids beyond the vocabulary": (["{tmp}/ids_high.py", *QUICK],
                                        "calibration data holds token id 128, outside the model's vocabulary"),
    "negative token ids": (["{tmp}/ids_negative.py", *QUICK], "holds token id -1"),
    "empty calibration file": ([LLAMA, "--calib-file", "{tmp}/empty.txt"], "empty.txt is empty"),
    "recipe that is not UTF-8": ([LLAMA, "--recipe", "{tmp}/latin1.toml"], "is not UTF-8 text"),
    "recipe that is a folder": ([LLAMA, "--recipe", "{tmp}"], "is a folder, not a TOML file"),
    "output below a file": ([LLAMA, "--out", "{tmp}/notes.txt/o"], "cannot write the output"),
    "untraceable model: one line, no graph dump": (["{tmp}/branchy.py"], "cannot trace Branchy"),
    "a folder as the model file": (["{tmp}"], "is a folder, not a Python file"),
    "--eval-windows 0": ([LLAMA, "--eval-windows", "0"], "eval_windows must be at least 1"),
    "--round-to above half a group": ([LLAMA, "--round-to", "64"], "--round-to 64 cannot apply to group"),
    "negative damping": ([LLAMA, "--recipe", "{tmp}/neg_damp.toml"], "damp_a (damping) must be positive"),
    "NaN damping": ([LLAMA, "--recipe", "{tmp}/nan_damp.toml"], "damp_a must be a finite number"),
    "NaN target": ([LLAMA, "--target", "nan"], "target must be a finite number"),
    "--overwrite over a folder that is not an output": (
        [LLAMA, "--out", "{tmp}", "--overwrite"], "--overwrite refused"),
}


PROGRESS = re.compile(r"\[\s*\d+\.\d s\] ")  # the per-stage progress lines when stderr is not a terminal


def only_line(err: str) -> str:
    """The one line of stderr besides progress lines; it must be the last line."""
    lines = [line for line in err.splitlines() if not PROGRESS.match(line)]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.fixture
def workspace(tmp_path):
    for name, source in MODEL_FILES.items():
        (tmp_path / name).write_text(source)
    for name, data in OTHER_FILES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "run").mkdir()
    return tmp_path


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case, workspace, capsys):
    args, expected = CASES[case]
    argv = [a.replace("{tmp}", str(workspace)) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(workspace / "run" / "o")]
    before = listing(workspace)
    assert main(argv) == 2
    err = only_line(capsys.readouterr().err)
    assert err.startswith("surgeon-compile: error: ") and "internal error" not in err, err
    assert expected in err, err
    assert listing(workspace) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_parent(workspace, capsys):
    parent = workspace / "run"
    parent.chmod(0o555)
    try:
        assert main([LLAMA, "--out", str(parent / "o")]) == 2
    finally:
        parent.chmod(0o755)
    assert "cannot write the output" in only_line(capsys.readouterr().err)
    assert not any(parent.iterdir())
