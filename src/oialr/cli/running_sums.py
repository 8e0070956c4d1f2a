"""The training loss and correct predictions since the last metrics row: summed on the device (no sync per step),
all-reduced for the row, and saved per process in the checkpoint so that a resumed run continues the same sums."""
from __future__ import annotations

from typing import Any

import torch

from .. import distributed


class RunningSums:
    """``loss`` (summed over predictions), ``correct`` predictions and ``seen`` predictions of this process."""

    def __init__(self, device: torch.device, loss: float = 0.0, correct: int = 0, seen: int = 0):
        self.loss = torch.tensor(loss, dtype=torch.float64, device=device)
        self.correct = torch.tensor(correct, dtype=torch.int64, device=device)
        self.seen = seen

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: its mean ``loss`` over the ``y.numel()`` targets ``y``, and ``logits`` (``y.shape + (K,)``)."""
        self.loss += loss.detach() * y.numel()
        self.correct += (logits.argmax(-1) == y).sum()
        self.seen += y.numel()

    def plain(self) -> dict[str, float | int]:
        return {"loss": float(self.loss), "correct": int(self.correct), "seen": self.seen}

    def totals(self) -> tuple[float, float, float]:
        """``(loss, correct, seen)`` summed over all processes (:func:`oialr.distributed.all_reduce`)."""
        loss, correct, seen = distributed.all_reduce([float(self.loss), int(self.correct), self.seen])
        return loss, correct, seen

    def gathered(self) -> dict[str, list]:
        """Every process's sums, ``{"loss": [per process], "correct": [...], "seen": [...]}``, for the checkpoint."""
        plain = self.plain()
        rows = distributed.all_gather(list(plain.values()))
        return {k: [type(v)(row[i]) for row in rows] for i, (k, v) in enumerate(plain.items())}

    @classmethod
    def restored(cls, saved: dict[str, Any], device: torch.device, rank: int, world_size: int) -> RunningSums:
        """This process's share of the saved sums: its own under the same number of processes, else the totals on
        process 0 (a scalar is an older checkpoint's process-0 sums)."""
        if not saved:
            return cls(device)
        if not isinstance(saved["loss"], list):
            return cls(device, **saved) if rank == 0 else cls(device)
        if len(saved["loss"]) == world_size:
            return cls(device, **{k: v[rank] for k, v in saved.items()})
        return cls(device, **{k: sum(v) for k, v in saved.items()}) if rank == 0 else cls(device)
