"""Text corpora -> token ids -> fixed-length windows for calibration and evaluation.

Settings (update rule, damping, shots, FLAP's standardisation) are chosen on *validation* windows:
`validation_windows` cuts the calibration text (wikitext-2 valid.txt) into windows that share no token with
the calibration windows of the same seed, so the test windows stay unseen until the final numbers.

Evaluation follows the SparseGPT / LLM Surgeon harness: the whole test text is
tokenized once (with the tokenizer's default special tokens, as the harness's
``tokenizer(text)`` call does) and cut into non-overlapping windows. The paper
harness builds the text as ``"\\n\\n".join(dataset["text"])``; a local raw file
is read as-is.
"""

import hashlib
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


def calibration_starts(n_ids: int, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """The ``n`` random starts in ``[0, n_ids - length]`` of `calibration_windows` (LongTensor [n])."""
    if n_ids < length:
        raise ValueError(f"text has {n_ids} tokens, fewer than one window of {length}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_ids - length + 1, (n,), generator=gen)


def calibration_windows(ids: torch.Tensor, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at random starts in ``[0, N - length]``.

    Starts are drawn with a ``torch.Generator`` seeded with ``seed``, so the
    windows are reproducible. Returns a LongTensor [n, length].
    """
    _check_ids(ids, length)
    starts = calibration_starts(ids.numel(), n, length, seed)
    offsets = torch.arange(length)
    return ids[starts[:, None] + offsets[None, :]].long()


def validation_windows(ids: torch.Tensor, length: int, calib_n: int, calib_length: int, seed: int = 0,
                       limit: int | None = None) -> torch.Tensor:
    """Held-out windows of the calibration text: ``length`` tokens each, overlapping no calibration window.

    The calibration windows are those of ``calibration_windows(ids, calib_n, calib_length, seed)``.  A scan
    from token 0 takes a window at the current position when it overlaps none of them (then moves ``length``
    on) and otherwise jumps past the end of the calibration window it hits, so the validation windows are
    disjoint from each other and from every calibration token.  Returns the first ``limit`` (default all),
    LongTensor [k, length]; ValueError when none fits.
    """
    _check_ids(ids, length)
    starts = calibration_starts(ids.numel(), calib_n, calib_length, seed).sort().values.tolist()
    taken, pos, i = [], 0, 0
    while pos + length <= ids.numel() and (limit is None or len(taken) < limit):
        while i < len(starts) and starts[i] + calib_length <= pos:
            i += 1  # calibration windows that end before `pos` can no longer overlap
        hits = [s + calib_length for s in starts[i:] if s < pos + length]  # ends of the overlapping ones
        if hits:
            pos = max(hits)
        else:
            taken.append(pos)
            pos += length
    if not taken:
        raise ValueError(f"no window of {length} tokens avoids the {calib_n} calibration windows of "
                         f"{calib_length} tokens in a text of {ids.numel()} tokens")
    return torch.stack([ids[p : p + length] for p in taken]).long()


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


def digest(data) -> str:
    """Hex sha256 of a nest of tensors, lists, tuples, dicts and plain values (calibration batches, a state
    dict): each tensor's dtype, shape and bytes, so that equal digests mean equal data."""
    h = hashlib.sha256()
    _feed(h, data)
    return h.hexdigest()


def _feed(h, x) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data)
    elif isinstance(x, dict):
        h.update(f"D{len(x)}".encode())
        for key, value in x.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(x, (list, tuple)):
        h.update(f"L{len(x)}".encode())
        for value in x:
            _feed(h, value)
    else:
        h.update(f"V{x!r}".encode())
