"""Refusing to factor or rotate a broken state: the checks the controller runs on every layer before it changes any."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from . import distributed


class DegenerateStateError(ValueError):
    """A weight or factor holds NaN/Inf (a diverged run), or a weight is all zeros, at the transition or a basis
    update. Raised before any layer changed: the model and the optimizer are as they were after the last optimizer
    step, so the run can be resumed from its last checkpoint (e.g. with a lower learning rate). ``layers`` lists
    the layers at fault, ``step`` the controller's step."""

    def __init__(self, message: str, layers: list[str], step: int):
        super().__init__(message)
        self.layers, self.step = layers, step


def problem(name: str, tensors: Mapping[str, Tensor]) -> str | None:
    """What is wrong with one layer's ``tensors`` (``{"W": weight}`` or ``{"U": .., "Σ": .., "V": ..}``), or None:
    ``"'fc1' (Σ: 3 NaN, V: 1 Inf)"``, or ``"'fc1' (W: all zeros)"`` (a zero ``W`` has no singular vectors to keep,
    a zero ``Σ`` collapses the rank to 1)."""
    found = []
    for label, t in tensors.items():
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        found += [f"{label}: {count} {kind}" for count, kind in ((nan, "NaN"), (inf, "Inf")) if count]
    if not found:
        found += [f"{label}: all zeros" for label, t in tensors.items() if t.count_nonzero() == 0]
    return f"{name!r} ({', '.join(found)})" if found else None


def check_layers(layers: Mapping[str, Mapping[str, Tensor]], *, step: int, event: str) -> None:
    """Raise :class:`DegenerateStateError` naming every layer of ``layers`` with a non-finite or all-zero tensor.
    Under ``torch.distributed`` process 0's verdict is broadcast, so that every process raises together (its
    factors are the ones every process adopts)."""
    found = {name: p for name, tensors in layers.items() if (p := problem(name, tensors)) is not None} \
        if distributed.is_source() else None
    found = distributed.broadcast_object(found)
    if found:
        raise DegenerateStateError(_message(list(found.values()), step, event), list(found), step)


def _message(problems: Sequence[str], step: int, event: str) -> str:
    return (f"OIALR {event} at step {step} refused: {'; '.join(problems)}. Nothing was changed; the training "
            "diverged (or a layer never trained): restart from the last checkpoint with a lower learning rate or "
            "gradient clipping, or list the layer in exclude_modules")
