"""--calib-file / --eval-file take a file, a folder or a glob of files (`surgeon_fx.data.read_text`)."""
from pathlib import Path

import pytest
import torch

from surgeon_fx.cli import main
from surgeon_fx.compile import calibration_data, evaluation_data
from surgeon_fx.data import calibration_windows, eval_windows, read_text, text_files, tokenize
from surgeon_fx.hf import tiny_llama
from surgeon_fx.methods import resolve
from surgeon_fx.modelfile import load_model_file
from surgeon_fx.recipe import Recipe
from surgeon_fx.zoo import ByteTokenizer

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture
def corpus(tmp_path):
    """b.py, a.py and sub/c.py with distinct text, plus notes.txt."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    texts = {"b.py": "def b():\n    return 2\n" * 20, "a.py": "x = 'alpha'\n" * 30,
             "sub/c.py": "class C:\n    pass\n" * 25, "notes.txt": "plain words here. " * 40}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    return root, texts


def test_a_glob_joins_its_files_in_path_order(corpus):
    root, texts = corpus
    assert [p.name for p in text_files(root / "*.py")] == ["a.py", "b.py"]
    assert read_text(root / "*.py") == texts["a.py"] + "\n\n" + texts["b.py"]
    assert [p.relative_to(root).as_posix() for p in text_files(f"{root}/**/*.py")] == ["a.py", "b.py", "sub/c.py"]


def test_a_folder_is_every_file_under_it(corpus):
    root, texts = corpus
    assert [p.relative_to(root).as_posix() for p in text_files(root)] == ["a.py", "b.py", "notes.txt", "sub/c.py"]
    assert read_text(root).startswith(texts["a.py"] + "\n\n" + texts["b.py"] + "\n\n" + texts["notes.txt"])
    assert read_text(root / "notes.txt") == texts["notes.txt"]


def test_names_without_files_are_errors(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(FileNotFoundError, match="names no files"):
        text_files(root / "*.rs")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        text_files(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="names no files"):
        text_files(tmp_path / "empty")
    (root / "blob.py").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="blob.py is not UTF-8 text"):
        read_text(root / "*.py")


def test_compile_reads_calibration_and_evaluation_from_globs(corpus):
    root, texts = corpus
    mf = load_model_file(MODELS / "tiny_llama.py")
    recipe = Recipe(calib_file=f"{root}/**/*.py", calib_windows=3, calib_length=16, eval_file=str(root / "sub"),
                    eval_length=32, eval_windows=2)
    ids = tokenize(ByteTokenizer(128), "\n\n".join(texts[n] for n in ("a.py", "b.py", "sub/c.py")))
    assert torch.equal(calibration_data(mf, recipe, resolve(recipe)), calibration_windows(ids, 3, 16, 0))
    assert torch.equal(evaluation_data(mf, recipe, tiny_llama()),
                       eval_windows(tokenize(ByteTokenizer(128), texts["sub/c.py"]), 32, limit=2))


def test_cli_takes_a_glob_and_a_folder(corpus, tmp_path, capsys):
    root, _ = corpus
    argv = [str(MODELS / "tiny_llama.py"), "--calib-file", f"{root}/*.py", "--eval-file", str(root), "--eval-length",
            "64", "--eval-windows", "2", "--calib-windows", "2", "--calib-length", "32", "--shots", "1", "--target",
            "0.9", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(argv[:2] + [f"{root}/*.rs"] + argv[3:-1] + [str(tmp_path / "o2")]) == 2
    assert "names no files" in capsys.readouterr().err
