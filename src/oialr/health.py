"""Refusing to factor or rotate a broken state: the checks the controller runs on every layer before it changes any."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .layers import LowRankLayer
from .targets import layer_weight


class DegenerateStateError(ValueError):
    """A weight or factor holds NaN/Inf (a diverged run), or is all zeros, at the transition or a basis
    update. Raised before any layer changed: the model and the optimizer are as they were after the last optimizer
    step, so the run can be resumed from its last checkpoint (e.g. with a lower learning rate). ``layers`` lists
    the layers at fault, ``step`` the controller's step."""

    def __init__(self, message: str, layers: list[str], step: int):
        super().__init__(message)
        self.layers, self.step = layers, step


def problems(layers: Mapping[str, Mapping[str, Tensor]], shards: bool = False) -> dict[str, str]:
    """What is wrong with each layer's tensors (``{"W": weight}`` or ``{"U": .., "Σ": .., "V": ..}``), for the
    layers with a problem: ``{"fc1": "'fc1' (Σ: 3 NaN, V: 1 Inf)"}``, or ``"'fc1' (W: all zeros)"`` (a zero ``W``
    has no singular vectors to keep, a zero ``Σ`` collapses the rank to 1). One device sync for all layers.
    ``shards``: the tensors are sharded (FSDP2 ``DTensor``s): each process counts in its rows, the counts are summed
    over the processes (one all-reduce)."""
    labels = [(name, label) for name, tensors in layers.items() for label in tensors]
    if not labels:
        return {}
    tensors = [t.to_local() if shards else t for group in layers.values() for t in group.values()]
    counts = [torch.stack([torch.isnan(t).sum(), torch.isinf(t).sum(), torch.count_nonzero(t)]) for t in tensors]
    where = counts[0].device
    counts = torch.stack([c.to(where) for c in counts]).tolist()
    if shards:
        flat = distributed.all_reduce([c for row in counts for c in row])
        counts = [flat[i:i + 3] for i in range(0, len(flat), 3)]
    found: dict[str, list[str]] = {}
    for (name, label), (nan, inf, nonzero) in zip(labels, counts):
        bad = [f"{label}: {count} {kind}" for count, kind in ((nan, "NaN"), (inf, "Inf")) if count]
        found.setdefault(name, []).extend(bad or ([f"{label}: all zeros"] if nonzero == 0 else []))
    return {name: f"{name!r} ({', '.join(bad)})" for name, bad in found.items() if bad}


def check_layers(layers: Mapping[str, Mapping[str, Tensor]], *, step: int, event: str, shards: bool = False) -> None:
    """Raise :class:`DegenerateStateError` naming every layer of ``layers`` with a non-finite or all-zero tensor.
    Under ``torch.distributed`` process 0's verdict is broadcast, so that every process raises together (its
    factors are the ones every process adopts); with ``shards`` every process counts its rows (:func:`problems`)."""
    if shards:
        found = problems(layers, shards=True)
    else:
        found = distributed.broadcast_object(problems(layers) if distributed.is_source() else None)
    if found:
        raise DegenerateStateError(_message(list(found.values()), step, event), list(found), step)


def check_weights(model: nn.Module, targets: list[str], step: int, shards: bool = False) -> None:
    """:func:`check_layers` on the dense weights of the layers ``targets``, before the transition."""
    check_layers({name: {"W": layer_weight(model, name)[1]} for name in targets}, step=step, event="transition",
                 shards=shards)


def check_factors(layers: Mapping[str, LowRankLayer], step: int, shards: bool = False) -> None:
    """:func:`check_layers` on every factored layer's ``U``, ``Σ``, ``V``, before a basis update."""
    check_layers({name: {"U": layer.lowrank_U, "Σ": layer.lowrank_S, "V": layer.lowrank_V}
                  for name, layer in layers.items()}, step=step, event="basis update", shards=shards)


def _message(problems: Sequence[str], step: int, event: str) -> str:
    return (f"OIALR {event} at step {step} refused: {'; '.join(problems)}. Nothing was changed; the training "
            "diverged (or a layer never trained): restart from the last checkpoint with a lower learning rate or "
            "gradient clipping, or list the layer in exclude_modules")
