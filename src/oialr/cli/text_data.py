"""A byte-level text corpus (Debian's ``fortunes`` by default, or the user's files), its fixed train/validation split,
and a deterministic, shardable loader of ``(input, next-byte target)`` windows."""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .data import DataError

FORTUNES_DIR = "/usr/share/games/fortunes"      # Debian package fortunes (about 2.6 MB of English text)
HOW_TO_GET_TEXT = ("install the Debian package fortunes (apt-get install fortunes) or pass --data-dir with a text "
                   "file or a folder of text files")
VAL_FRACTION = 0.05                              # the last 5% of every file is validation text
VOCAB_SIZE = 256                                 # one token per byte
_SEPARATOR = re.compile(rb"^%\r?\n", re.MULTILINE)   # fortune files put a line "%" between entries


@dataclass
class TextDataset:
    """Byte tokens ``uint8 (N,)`` of the training and validation text, and where they came from.

    ``input_shape`` is one sample, ``(context_length,)``; ``num_classes`` the vocabulary (256 bytes).
    """

    name: str
    train: Tensor
    val: Tensor
    context_length: int
    files: int
    sha256: str                                  # of the train bytes, then the validation bytes
    num_classes: int = VOCAB_SIZE

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.context_length,)

    def info(self) -> dict:
        """Plain values for results files: which text, how much of it, its checksum."""
        return {"files": self.files, "train_bytes": len(self.train), "val_bytes": len(self.val),
                "sha256": self.sha256}


def load_text(data_dir: str | None = None, context_length: int = 256) -> TextDataset:
    """The corpus at ``data_dir`` (a file, or a folder read recursively; default ``FORTUNES_DIR``), split.

    Every file is read as bytes; files holding a NUL byte (binary, e.g. fortune's ``.dat`` indexes), hidden files
    and second paths to the same file (symlinks) are skipped. Lines that are exactly ``%`` (the fortune separator)
    become empty lines, so entries are separated by a blank line. Each file is split on its own
    (:func:`split_bytes`): its last ``VAL_FRACTION`` goes to validation, so both splits sample every file. Files
    are taken in sorted path order, so the split is the same on every machine. Raises ``DataError`` (one line)
    for a missing, unreadable or empty corpus, or one too small for a window of ``context_length + 1`` bytes.
    """
    path = data_dir or FORTUNES_DIR
    texts = [_SEPARATOR.sub(b"\n", blob) for blob in _read_corpus(path)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"text data {path} holds no text (no non-empty file without NUL bytes); {HOW_TO_GET_TEXT}")
    parts = [split_bytes(t, VAL_FRACTION) for t in texts]
    train, val = b"".join(p[0] for p in parts), b"".join(p[1] for p in parts)
    for split, blob in (("training", train), ("validation", val)):
        if len(blob) < context_length + 1:
            raise DataError(f"text data {path}: the {split} split has {len(blob)} bytes, fewer than one window of "
                            f"context_length + 1 = {context_length + 1}; give more text or a smaller context_length")
    digest = hashlib.sha256(train + val).hexdigest()
    return TextDataset("text", _tokens(train), _tokens(val), context_length, len(texts), digest)


def _read_corpus(path: str) -> list[bytes]:
    if not os.path.exists(path):
        raise DataError(f"text data not found: {path}; {HOW_TO_GET_TEXT}")
    if os.path.isdir(path):
        paths, seen = [], set()
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                full = os.path.join(root, name)
                real = os.path.realpath(full)
                if not name.startswith(".") and os.path.isfile(full) and real not in seen:
                    seen.add(real)
                    paths.append(full)
        if not paths:
            raise DataError(f"text data folder {path} holds no files; {HOW_TO_GET_TEXT}")
    else:
        paths = [path]
    blobs = []
    for file in paths:
        try:
            with open(file, "rb") as f:
                blob = f.read()
        except OSError as err:
            raise DataError(f"text file {file} cannot be read ({err.strerror}); {HOW_TO_GET_TEXT}") from None
        if b"\0" not in blob:
            blobs.append(blob)
    return blobs


def split_bytes(text: bytes, val_fraction: float) -> tuple[bytes, bytes]:
    """``(train, val)``: ``text`` cut near ``ceil((1 - val_fraction) · len)``, moved forward to the next blank line
    (a paragraph or fortune boundary), else the next line start, when there is one; validation gets the rest."""
    cut = math.ceil((1.0 - val_fraction) * len(text))
    for boundary in (b"\n\n", b"\n"):
        found = text.find(boundary, cut)
        if found != -1:
            cut = found + len(boundary)
            break
    return text[:cut], text[cut:]


def _tokens(blob: bytes) -> Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class TextLoader:
    """Batches ``(x, y)`` of ``int64 (B, T)`` windows of a byte stream ``tokens (N,)``, ``y`` = ``x`` one byte on.

    Training (``shuffle=True``): epoch ``e`` (``set_epoch``) draws, from a generator seeded ``seed + e``, an offset
    ``o`` in ``[0, T)`` (fewer for a text under ``2T`` bytes) and an order of the ``W = max((N - T) // T, 1)``
    windows starting at ``o, o + T, ...``: one epoch is one pass over the training bytes (all but under ``2T`` of
    them), cut at a new place every epoch. Batches of ``batch_size`` windows, the last partial one dropped.
    Evaluation (``shuffle=False``): the ``(N - 1) // T`` windows from offset 0, in order, the last batch possibly
    smaller; every byte but the first and the last ``< T`` is predicted once. With ``world_size > 1`` every process
    takes every ``world_size``-th window of the same order, starting at ``rank`` (the windows are first cut to a
    multiple of ``world_size``).
    """

    def __init__(self, tokens: Tensor, context_length: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if tokens.dim() != 1 or len(tokens) < context_length + 1:
            raise ValueError(f"tokens must be 1-D with at least context_length + 1 = {context_length + 1} entries, "
                             f"got shape {tuple(tokens.shape)}")
        if context_length < 1 or batch_size < 1:
            raise ValueError(f"context_length and batch_size must be >= 1, got {context_length} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        n, t = len(tokens), context_length
        self.windows = max((n - t) // t, 1) if shuffle else (n - 1) // t
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration draws (its offset and order); call it before each epoch."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Windows this process sees per epoch."""
        return self.windows // self.world_size

    def __len__(self) -> int:
        n, bs = self.num_samples, self.batch_size
        return n // bs if self.shuffle else -(-n // bs)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        t, w = self.context_length, self.windows
        room = min(t, len(self.tokens) - w * t)                               # offsets that fit W windows + 1
        offset = int(torch.randint(room, (1,), generator=gen)) if self.shuffle else 0
        span = self.tokens[offset:offset + w * t + 1].long()
        x_all, y_all = span[:-1].view(w, t), span[1:].view(w, t)               # (W, T) each
        order = torch.randperm(w, generator=gen) if self.shuffle else torch.arange(w)
        idx = order[: self.num_samples * self.world_size][self.rank::self.world_size]
        for i in range(len(self)):
            batch = idx[i * self.batch_size:(i + 1) * self.batch_size]
            yield x_all[batch], y_all[batch]
