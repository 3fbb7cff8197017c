"""Building blocks of the ready model files in `models/`: a byte tokenizer, text data, small vision models.

The tiny language models in `models/` have random weights and a 128-token vocabulary, so they read text with
`ByteTokenizer` (one token per UTF-8 byte; bytes ≥ vocab become vocab − 1).  Text comes from the WikiText-2
files of the shared data folder, found at ``<repo root>/../shared/data`` or under ``$SURGEON_DATA``.
`ResNetCNN` and `ViTEncoder` are small random-weight vision models for the image model files.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surgeon_fx.data import calibration_windows, eval_windows, read_text, tokenize

CALIB_TEXT = "wikitext-2/valid.txt"
EVAL_TEXT = "wikitext-2-raw/wiki.test.raw"


def data_file(relative: str) -> Path:
    """A file of the shared data folder: ``$SURGEON_DATA/relative``, else ``<repo>/../shared/data/relative``."""
    root = os.environ.get("SURGEON_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    return Path(root) / relative


class ByteTokenizer:
    """Text → one token per UTF-8 byte, clamped to `vocab` − 1; called like a Hugging Face tokenizer."""

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        data = bytearray(text.encode("utf-8"))
        ids = torch.frombuffer(data, dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
        return {"input_ids": ids.clamp_max(self.vocab - 1)[None]}


def text_calibration(tokenizer, n: int, length: int, seed: int, source: str | Path | None = None) -> torch.Tensor:
    """[n, length] random windows of the calibration text (default: WikiText-2 valid)."""
    ids = tokenize(tokenizer, read_text(source or data_file(CALIB_TEXT)))
    return calibration_windows(ids, n, length, seed)


def text_evaluation(tokenizer, length: int, limit: int | None = None,
                    source: str | Path | None = None) -> torch.Tensor:
    """[k, length] non-overlapping windows of the evaluation text (default: WikiText-2 raw test), k ≤ limit."""
    ids = tokenize(tokenizer, read_text(source or data_file(EVAL_TEXT)))
    return eval_windows(ids, length, limit=min(limit, ids.numel() // length) if limit else None)


def byte_text_contract(vocab: int = 128, eval_length: int = 128, eval_limit: int = 32):
    """(tokenizer, calibration, evaluation) functions of a model file over WikiText-2 read one byte per token."""

    def tokenizer():
        return ByteTokenizer(vocab=vocab)

    def calibration(n, length, seed):
        return text_calibration(tokenizer(), n, length, seed)

    def evaluation():
        return text_evaluation(tokenizer(), length=eval_length, limit=eval_limit)

    return tokenizer, calibration, evaluation


def image_contract(size: int, classes: int):
    """(example_inputs, calibration, loss, evaluation) of a model file for random size × size RGB images."""

    def example_inputs():
        return (torch.randn(2, 3, size, size),)

    def calibration(n, length, seed):  # length: not used by image models
        return image_batches(n, batch=8, classes=classes, size=size, seed=seed)

    def evaluation():
        return image_batches(64, batch=16, classes=classes, size=size, seed=12345)

    return example_inputs, calibration, classification_loss, evaluation


def image_batches(n: int, batch: int, classes: int, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` random images [3, size, size] with random labels, in batches of `batch` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return list(zip(images.split(batch), labels.split(batch)))


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Summed cross-entropy of one (images, labels) batch: the `loss` of the image model files."""
    images, labels = batch
    return F.cross_entropy(model(images), labels, reduction="sum")


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN with an identity shortcut (ResNet basic block)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden)
        self.conv2, self.bn2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetCNN(nn.Module):
    """Stem conv, residual stages, global average pooling, linear classifier."""

    def __init__(self, channels: int = 16, hidden: int = 32, blocks: int = 2, classes: int = 10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*[Residual(channels, hidden) for _ in range(blocks)])
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block: multi-head self-attention (SDPA) and a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.o(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTEncoder(nn.Module):
    """Vision transformer: patch embedding conv, class token, learned positions, encoder blocks, head."""

    def __init__(self, image: int = 16, patch: int = 4, width: int = 32, heads: int = 4, depth: int = 2,
                 mlp: int = 64, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, mlp) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
