"""The learning-rate schedule of ``oialr train``."""
from __future__ import annotations

import math

from .settings import TrainConfig


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps``, then cosine decay to 0."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
