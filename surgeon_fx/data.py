"""Text corpora -> token ids -> fixed-length windows for calibration and evaluation.

Evaluation follows the SparseGPT / LLM Surgeon harness: the whole test text is
tokenized once (with the tokenizer's default special tokens, as the harness's
``tokenizer(text)`` call does) and cut into non-overlapping windows. The paper
harness builds the text as ``"\\n\\n".join(dataset["text"])``; a local raw file
is read as-is.
"""

import glob
from pathlib import Path

import torch

HF_PREFIX = "hf://"


def text_files(source: str | Path) -> list[Path]:
    """The files a local corpus names: a file; a folder (every file under it, recursively); or a glob pattern
    (``*``, ``?``, ``[…]``, ``**`` for any depth).  Sorted by path; an empty folder or pattern is an error."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif any(c in str(source) for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
    else:
        raise FileNotFoundError(f"no such file or folder: {source}")
    if not files:
        raise FileNotFoundError(f"{source} names no files")
    return files


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_text(source: str | Path) -> str:
    """Read a corpus: a local text file, folder or glob pattern (`text_files`; several files are joined with
    ``"\\n\\n"`` in path order), or ``hf://<dataset>/<config>/<split>``.

    The ``hf://`` form uses the ``datasets`` library (imported lazily, needs network)
    and joins the split's ``text`` column with ``"\\n\\n"`` like the paper harness.
    """
    source = str(source)
    if not source.startswith(HF_PREFIX):
        return "\n\n".join(_utf8(p) for p in text_files(source))
    parts = source[len(HF_PREFIX):].split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"expected hf://<dataset>/<config>/<split>, got {source!r}")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"reading {source!r} needs the 'datasets' package and network access "
            "(pip install datasets); or pass a local text file path instead"
        ) from err
    dataset, config, split = parts
    return "\n\n".join(datasets.load_dataset(dataset, config, split=split)["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole ``text`` in one call. Returns a LongTensor [N]."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids.reshape(-1).long()


def _check_ids(ids: torch.Tensor, length: int) -> None:
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D [N], got shape {tuple(ids.shape)}")
    if length < 1:
        raise ValueError(f"window length must be positive, got {length}")


def calibration_windows(ids: torch.Tensor, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at random starts in ``[0, N - length]``.

    Starts are drawn with a ``torch.Generator`` seeded with ``seed``, so the
    windows are reproducible. Returns a LongTensor [n, length].
    """
    _check_ids(ids, length)
    if ids.numel() < length:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=gen)
    offsets = torch.arange(length)
    return ids[starts[:, None] + offsets[None, :]].long()


def eval_windows(ids: torch.Tensor, length: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``ids[i*length:(i+1)*length]``, i < min(N // length, limit).

    The incomplete tail is dropped (as the SparseGPT harness does).
    Returns a LongTensor [k, length].
    """
    _check_ids(ids, length)
    k = ids.numel() // length
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        if limit > k:
            raise ValueError(f"text has {ids.numel()} tokens: only {k} windows of {length}, asked for {limit}")
        k = limit
    if k == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {length}")
    return ids[: k * length].reshape(k, length).long()
