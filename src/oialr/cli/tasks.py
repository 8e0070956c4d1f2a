"""What differs between classification (MNIST-1D, Fashion-MNIST) and byte-level language modelling (text) in a
training run: the loaders, the evaluation metrics' names and the headline results."""
from __future__ import annotations

import math
from typing import Any

from .data import Loader
from .settings import TrainConfig
from .text_data import TextDataset, TextLoader

EVAL_BATCH_WINDOWS = 32        # text: windows per evaluation batch (images: 1000 samples)
PHASES = ("full-rank", "low-rank")


def is_text(data) -> bool:
    return isinstance(data, TextDataset)


def make_loaders(data, cfg: TrainConfig, rank: int, world_size: int):
    """``(train, evaluation)`` loaders of this process's shard: every ``world_size``-th sample or window."""
    batch = cfg.batch_size // world_size
    if is_text(data):
        train = TextLoader(data.train, cfg.context_length, batch, shuffle=True, seed=cfg.seed, rank=rank,
                           world_size=world_size)
        val = TextLoader(data.val, cfg.context_length, EVAL_BATCH_WINDOWS, shuffle=False, rank=rank,
                         world_size=world_size)
        return train, val
    images = len(data.input_shape) == 3
    train = Loader(data.train.x, data.train.y, batch, shuffle=True, drop_last=True, augment=cfg.augment and images,
                   pad_value=data.pad_value, seed=cfg.seed, rank=rank, world_size=world_size)
    shard = slice(rank, None, world_size)
    return train, Loader(data.test.x[shard], data.test.y[shard], 1000, shuffle=False)


def eval_row(data, loss: float, top1: float) -> dict[str, float]:
    """Evaluation metrics under their names: ``test_loss``, ``test_top1`` for classification; for text
    ``val_loss`` (mean cross-entropy per byte, nats), ``val_bpb = val_loss / ln 2`` (bits per byte) and
    ``val_top1`` (next-byte accuracy)."""
    if is_text(data):
        return {"val_loss": loss, "val_bpb": loss / math.log(2), "val_top1": top1}
    return {"test_loss": loss, "test_top1": top1}


def throughput(seconds: dict[str, float], samples: dict[str, int]) -> dict[str, float | None]:
    """Tokens per second of training, overall and in each phase (``None`` for a phase the run never had).

    The full-rank phase is every step before the switch to low rank, the switching step (and its SVDs)
    included; the low-rank phase every step after it, basis updates included. Times are the training steps'
    own (forward, backward, optimizer, controller), without evaluation or data loading.
    """
    def rate(s: float, n: int) -> float | None:
        return n / s if s > 0 else None

    total = rate(sum(seconds.values()), sum(samples.values()))
    return {"tokens_per_second": total,
            **{f"tokens_per_second_{p.replace('-', '_')}": rate(seconds[p], samples[p]) for p in PHASES}}


def headline(data, metrics: list[dict]) -> dict[str, Any]:
    """The results' first keys: final and best ``top1`` (classification) or ``val_bpb`` and ``val_loss`` (text)."""
    final = metrics[-1] if metrics else {}
    if is_text(data):
        return {"val_bpb": final.get("val_bpb"), "best_val_bpb": min((m["val_bpb"] for m in metrics), default=None),
                "val_loss": final.get("val_loss")}
    return {"top1": final.get("test_top1"), "best_top1": max((m["test_top1"] for m in metrics), default=None)}
