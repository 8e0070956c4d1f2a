"""Evaluating a model on the held-out split during ``oialr train``."""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, same_forwards: bool = False) -> tuple[float, float]:
    """Test (text: validation) loss, plain cross-entropy per prediction, and top-1 accuracy of ``model`` on
    ``loader``'s batches; advances no schedule and leaves ``model`` in training mode. Distributed: each process
    evaluates its shard with rank 0's buffers (BatchNorm statistics), the sums are all-reduced. ``same_forwards``
    (a sharded model, whose every forward is a collective): a process with fewer batches than another runs its last
    one again, unscored, until all have run as many forwards."""
    distributed.broadcast_(list(model.buffers()))
    model.eval()
    loss, correct, n = 0.0, 0, 0
    batches = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).flatten(0, -2)
        loss += nn.functional.cross_entropy(logits, y.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y.flatten()).sum().item()
        n += y.numel()
        batches += 1
    for _ in range(int(distributed.all_reduce([batches], op="max")[0]) - batches if same_forwards else 0):
        model(x)
    model.train()
    loss, correct, n = distributed.all_reduce([loss, correct, n])
    return loss / n, correct / n
