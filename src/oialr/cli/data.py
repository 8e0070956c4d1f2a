"""In-memory datasets (MNIST-1D, Fashion-MNIST; text in ``text_data``) and a fast, deterministic, shardable
minibatch loader."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASET_NAMES = ("mnist1d", "fashion-mnist", "text")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"     # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET_FASHION_MNIST = ("install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                            "or download the four IDX files from the Fashion-MNIST project and pass --data-dir DIR")
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}                # unsigned-byte IDX files: labels (1-D), images (3-D)


class DataError(Exception):
    """A dataset is missing, corrupt or cannot be built; the message is one line that says how to fix it."""


@dataclass
class Split:
    """One split held in memory: ``x`` float32 ``(N, *input_shape)``, ``y`` int64 ``(N,)``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class InMemoryDataset:
    """Train and test splits plus what a model and loader need to know about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]      # one sample: (1, 40) for MNIST-1D, (1, 28, 28) for Fashion-MNIST
    mean: float = 0.0                 # inputs were normalised as x = (raw - mean) / std
    std: float = 1.0

    @property
    def pad_value(self) -> float:
        """A raw zero (black pixel) after normalisation: the value to pad images with when cropping."""
        return -self.mean / self.std


def load_dataset(name: str, data_dir: str | None = None, seed: int = 42, context_length: int = 256):
    """Load ``name`` (one of ``DATASET_NAMES``) into memory: an :class:`InMemoryDataset`, or for ``text`` a
    :class:`oialr.cli.text_data.TextDataset` of byte tokens with windows of ``context_length``.

    ``data_dir``: for Fashion-MNIST the folder with the IDX files (default ``FASHION_MNIST_DIR``); for MNIST-1D an
    optional cache folder; for text a text file or a folder of them (default: Debian's fortunes). ``seed`` is the
    MNIST-1D generation seed (the other datasets are fixed data and ignore it).
    """
    if name == "text":
        from .text_data import load_text
        return load_text(data_dir, context_length)
    if name == "mnist1d":
        return load_mnist1d(data_dir, seed)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")


# ---------------------------------------------------------------------------------------------------- MNIST-1D

def load_mnist1d(data_dir: str | None = None, seed: int = 42) -> InMemoryDataset:
    """MNIST-1D generated procedurally (never downloaded): 4000 train / 1000 test signals ``(1, 40)``, 10 classes.

    The generator reseeds numpy's and Python's global RNGs; both are restored, so the caller's streams are untouched.
    With ``data_dir`` the tensors are cached there as ``mnist1d-<hash of the generator arguments>.pt``.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError(f"MNIST-1D needs the mnist1d package ({exc}): pip install mnist1d "
                        "(or pip install -e .[cli])") from None
    args = get_dataset_args()
    args.seed = seed
    key = {k: v for k, v in sorted(vars(args).items()) if k != "url"}
    path = None
    if data_dir is not None:
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
        path = os.path.join(data_dir, f"mnist1d-{digest}.pt")
        tensors = _read_cache(path, key)
        if tensors is not None:
            return _mnist1d(tensors)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    tensors = {"x": torch.from_numpy(raw["x"]).float().unsqueeze(1), "y": torch.from_numpy(raw["y"]).long(),
               "x_test": torch.from_numpy(raw["x_test"]).float().unsqueeze(1),
               "y_test": torch.from_numpy(raw["y_test"]).long()}
    if path is not None:
        _write_cache(path, {"args": key, **tensors})
    return _mnist1d(tensors)


def _mnist1d(t: dict[str, Tensor]) -> InMemoryDataset:
    return InMemoryDataset("mnist1d", Split(t["x"], t["y"]), Split(t["x_test"], t["y_test"]), num_classes=10,
                           input_shape=tuple(t["x"].shape[1:]))


def _read_cache(path: str, key: dict) -> dict[str, Tensor] | None:
    """The cached tensors, or None when the file is absent, unreadable or made with other arguments."""
    try:
        blob = torch.load(path, weights_only=True)
    except Exception:          # absent, truncated, not a torch file: a cache miss, regenerate
        return None
    names = ("x", "y", "x_test", "y_test")
    if not isinstance(blob, dict) or blob.get("args") != key or not all(isinstance(blob.get(k), Tensor) for k in names):
        return None
    return blob


def _write_cache(path: str, blob: dict) -> None:
    """Write atomically (temp file in the same folder, then ``os.replace``) so readers never see half a file."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mnist1d-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------- Fashion-MNIST

def load_fashion_mnist(data_dir: str = FASHION_MNIST_DIR) -> InMemoryDataset:
    """Fashion-MNIST from the four IDX files (raw or ``.gz``) in ``data_dir``: 60000 train / 10000 test, 10 classes.

    Images become float32 ``(N, 1, 28, 28)``: pixels scaled to [0, 1], then normalised with the training set's
    mean and std (about 0.286 and 0.353). Raises ``DataError`` for a missing or corrupt file.
    """
    splits = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images_path, labels_path = _find(data_dir, images_name), _find(data_dir, labels_name)
        images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split} split: {images_path} holds {len(images)} images but "
                            f"{labels_path} holds {len(labels)} labels; {HOW_TO_GET_FASHION_MNIST}")
        if labels.size and labels.max() > 9:
            raise DataError(f"Fashion-MNIST file {labels_path}: label {labels.max()} outside 0..9; "
                            f"{HOW_TO_GET_FASHION_MNIST}")
        if images.shape[1:] != (28, 28):
            raise DataError(f"Fashion-MNIST file {images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                            f"expected 28x28; {HOW_TO_GET_FASHION_MNIST}")
        x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)     # (N, 1, 28, 28) in [0, 1]
        splits[split] = Split(x, torch.from_numpy(labels.astype(np.int64)))
    if len(splits["train"]) == 0:
        raise DataError(f"Fashion-MNIST training split in {data_dir} is empty; {HOW_TO_GET_FASHION_MNIST}")
    mean, std = splits["train"].x.mean().item(), splits["train"].x.std().item()
    for split in splits.values():
        split.x.sub_(mean).div_(std)
    return InMemoryDataset("fashion-mnist", splits["train"], splits["test"], num_classes=10,
                           input_shape=(1, 28, 28), mean=mean, std=std)


def _find(data_dir: str, name: str) -> str:
    """``data_dir/name``, or ``data_dir/name.gz`` when only that exists."""
    for path in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")):
        if os.path.isfile(path):
            return path
    raise DataError(f"Fashion-MNIST file not found: {os.path.join(data_dir, name)}[.gz]; {HOW_TO_GET_FASHION_MNIST}")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file (raw or gzip) as a ``uint8`` array of ``ndim`` dimensions, fully validated.

    Layout: big-endian ``uint32`` magic ``0x0000080<ndim>``, ``ndim`` big-endian ``uint32`` sizes, then the bytes.
    """
    def fail(problem: str) -> DataError:
        return DataError(f"Fashion-MNIST file {path}: {problem}; {HOW_TO_GET_FASHION_MNIST}")

    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise fail(f"cannot be read ({type(exc).__name__}: {exc})") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise fail(f"{len(data)} bytes, shorter than the {header}-byte IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise fail(f"magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} (unsigned bytes, {ndim}-D)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise fail(f"{len(data)} bytes, expected {expected} for dimensions {dims} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


# ------------------------------------------------------------------------------------------------------ Loader

def augment_images(x: Tensor, generator: torch.Generator, padding: int = 4, pad_value: float = 0.0) -> Tensor:
    """Random crop with padding and random horizontal flip of a whole batch ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    Each sample is padded by ``padding`` on every side with ``pad_value``, cropped back to ``H×W`` at its own
    offset in ``[0, 2·padding]²``, and mirrored left-right with probability 1/2.
    """
    b, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4, value=pad_value)                      # (B, C, H+2p, W+2p)
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = oy[:, None] + torch.arange(h)                                     # (B, H)
        cols = ox[:, None] + torch.arange(w)                                     # (B, W)
        x = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]   # (B, H, W, C)
        x = x.permute(0, 3, 1, 2).contiguous()
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class Loader:
    """Minibatches ``(x[idx], y[idx])`` from in-memory tensors ``x (N, ...)``, ``y (N,)``.

    Epoch ``e`` (``set_epoch``) shuffles with a ``torch.Generator`` seeded ``seed + e``, so a run is deterministic
    and resumes exactly at an epoch boundary. With ``world_size > 1`` every process shuffles identically and takes
    every ``world_size``-th index of the permutation, starting at ``rank``; the permutation is first cut to a
    multiple of ``world_size`` so all shards are equally long (up to ``world_size - 1`` samples skipped per epoch).
    ``augment`` (images ``(N, C, H, W)`` only) applies ``augment_images`` to each batch; keep it off for test data.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 augment: bool = False, padding: int = 4, pad_value: float = 0.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if world_size > len(x):
            raise ValueError(f"world_size={world_size} exceeds the {len(x)} samples; use fewer processes")
        if augment and x.dim() != 4:
            raise ValueError(f"augment needs images (N, C, H, W), got x of shape {tuple(x.shape)}; "
                             "pass augment=False for 1-D data")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.padding, self.pad_value, self.seed = padding, pad_value, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration draws (its shuffle and augmentation); call it before each epoch."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this process sees per epoch."""
        return len(self.x) // self.world_size

    def __len__(self) -> int:
        n, bs = self.num_samples, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.x)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        idx = order[: self.num_samples * self.world_size][self.rank::self.world_size]
        if self.augment:   # a stream of its own per rank, drawn from the shared one
            gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + self.rank)
        for i in range(len(self)):
            batch = idx[i * self.batch_size:(i + 1) * self.batch_size]
            xb, yb = self.x[batch], self.y[batch]
            if self.augment:
                xb = augment_images(xb, gen, self.padding, self.pad_value)
            yield xb, yb
