"""GaLore (Zhao et al., 2024): dense weights, AdamW moments kept for the gradient projected to rank ``r``; the
``galore-torch`` package's ``GaLoreAdamW``, with checkpoints that load with ``torch.load(weights_only=True)``.

Importing this module needs ``galore-torch`` (and the ``bitsandbytes`` and ``transformers`` it imports):
``pip install 'oialr[lm]'``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import GALORE_PROJ_TYPES

try:
    from galore_torch import GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector
except ImportError as exc:           # galore_torch imports bitsandbytes and transformers at import time
    raise ImportError(f"--method galore needs the galore-torch package ({exc}): pip install 'oialr[lm]'") from None

_PACKED = "projector_matrix"         # the projector's matrix (a tensor, or [left, right] for proj_type "full")


def galore_adamw(model: nn.Module, ranks: dict[str, int], *, lr: float, weight_decay: float, update_proj_gap: int,
                 scale: float, proj_type: str) -> torch.optim.Optimizer:
    """``GaLoreAdamW`` over ``model``'s trainable parameters: the weights of the layers in ``ranks`` (name -> ``r``)
    in one param group per rank with GaLore's settings, every other parameter in a plain AdamW group.

    Each step, a projected weight's gradient ``G (m×n)`` is multiplied by its projector ``P`` (for ``std``: the top
    ``r`` left singular vectors ``P (m×r)`` of ``G`` when ``m < n``, ``R = Pᵀ G (r×n)``; else the right ones,
    ``R = G Qᵀ``), recomputed from the current gradient every ``update_proj_gap`` steps; Adam's moments live on
    ``R``; the update ``scale · P N (m×n)`` of the normalised step ``N`` is applied to the dense weight.
    ``betas``/``eps`` are torch AdamW's defaults (0.9, 0.999)/1e-8, weight decay decoupled as in ``torch.optim.AdamW``.

    Resume: ``state_dict()`` stores each projector as its matrix (a plain tensor) and ``load_state_dict`` rebuilds the
    ``GaLoreProjector`` around it with the param group's settings, so a resumed run continues exactly.
    """
    if proj_type not in GALORE_PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {', '.join(GALORE_PROJ_TYPES)}, got {proj_type!r}")
    projected = {id(model.get_submodule(name).weight): r for name, r in ranks.items()}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in projected]
    groups: list[dict[str, Any]] = [{"params": plain}]
    for r in sorted(set(ranks.values())):
        weights = [p for p in model.parameters() if projected.get(id(p)) == r]
        groups.append({"params": weights, "rank": r, "update_proj_gap": update_proj_gap, "scale": scale,
                       "proj_type": proj_type})
    optimizer = GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, eps=1e-8, no_deprecation_warning=True)
    optimizer.register_state_dict_post_hook(_pack_projectors)
    optimizer.register_load_state_dict_post_hook(_unpack_projectors)
    return optimizer


def _pack_projectors(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace every ``GaLoreProjector`` object by its matrix, in copies of the per-parameter state dicts (the
    optimizer's own state is untouched)."""
    packed = {}
    for index, state in state_dict["state"].items():
        projector = state.get("projector")
        if projector is not None:
            state = {k: v for k, v in state.items() if k != "projector"}
            if projector.ortho_matrix is not None:
                state[_PACKED] = projector.ortho_matrix
        packed[index] = state
    state_dict["state"] = packed
    return state_dict


def _unpack_projectors(optimizer: torch.optim.Optimizer) -> None:
    """Rebuild the projectors ``load_state_dict`` restored as matrices, with their param group's settings."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and _PACKED in state:
                projector = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                            scale=group["scale"], proj_type=group["proj_type"])
                projector.ortho_matrix = state.pop(_PACKED)
                state["projector"] = projector

