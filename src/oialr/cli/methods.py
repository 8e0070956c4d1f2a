"""The optimizer and the controller of each ``--method`` besides OIALR: the peers of ``oialr.baselines``."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..baselines import FactorizedTraining, resolve_ranks
from ..baselines.ranks import linear_layers
from .settings import ConfigError, TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over every parameter at ``cfg.lr``; for ``galore``, GaLoreAdamW with the eligible layers'
    weights projected to their ranks (:func:`oialr.baselines.galore.galore_adamw`)."""
    if cfg.method == "galore":
        try:
            from ..baselines.galore import galore_adamw
        except ImportError as err:
            raise ConfigError(str(err)) from None
        return galore_adamw(model, _ranks(cfg, model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            update_proj_gap=cfg.galore_update_proj_gap, scale=cfg.galore_scale,
                            proj_type=cfg.galore_proj_type)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def peer_controller(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                    wrap: Callable[[nn.Module], nn.Module] | None) -> FactorizedTraining | None:
    """``factorized``: factored at step 0; ``svd-finetune``: after ``oialr.warmup_steps`` full-rank steps; else
    None (``full-rank``, ``galore``: nothing to do between steps)."""
    if cfg.method not in ("factorized", "svd-finetune"):
        return None
    start = 0 if cfg.method == "factorized" else cfg.oialr.warmup_steps
    try:
        return FactorizedTraining(model, optimizer, cfg.oialr, cfg.rank, start, wrap=wrap)
    except ValueError as err:
        raise ConfigError(f"method {cfg.method}: {err}") from None


def _ranks(cfg: TrainConfig, model: nn.Module) -> dict[str, int]:
    try:
        return resolve_ranks(cfg.rank, linear_layers(model, cfg.oialr))
    except ValueError as err:
        raise ConfigError(f"method {cfg.method}: {err}") from None
