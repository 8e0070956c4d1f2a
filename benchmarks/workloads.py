"""The benchmark workloads (model + batch) and the training configurations compared on each of them."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import oialr
from oialr.cli.models import build_model


class MeanTokens(nn.Module):
    """``(B, L, C) -> (B, C)``: the mean over the sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def transformer_block(width: int, heads: int, num_classes: int = 10) -> nn.Module:
    """One timm ViT ``Block`` (MLP ratio 4, no qkv bias) on ``(B, L, width)`` tokens, mean pooling, a Linear head."""
    from timm.models.vision_transformer import Block
    block = Block(width, heads, mlp_ratio=4.0, qkv_bias=False)
    return nn.Sequential(block, MeanTokens(), nn.Linear(width, num_classes))


@dataclass(frozen=True)
class Config:
    """A training configuration: full-rank (``rank_fraction=None``) or the low-rank phase of OIALR.

    ``path`` ``None``: every factored layer takes the path the library chooses (:func:`oialr.layers.forward_path`);
    one of :data:`oialr.layers.PATHS` forces that path on every factored layer (``"dense"``: rebuild ``W = U Σ Vᵀ``
    every forward, as the published OIALR code does) through :func:`oialr.force_path` while the model runs.
    """

    name: str
    rank_fraction: float | None
    path: str | None = None

    def path_context(self) -> contextlib.AbstractContextManager:
        """A context in which the model runs as this config says: ``oialr.force_path(path)``, or nothing for
        ``path=None``."""
        if self.path is None:
            return contextlib.nullcontext()
        return oialr.force_path(self.path)


FULL_RANK = "full-rank"
REBUILD = "dense rebuild f=0.25"
CONFIGS = {c.name: c for c in (
    Config(FULL_RANK, None),
    Config("f=1.0", 1.0),
    Config("f=0.5", 0.5),
    Config("f=0.25", 0.25),
    Config("f=0.1", 0.1),
    Config(REBUILD, 0.25, path="dense"),
)}


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    batch: int
    sample_shape: tuple[int, ...]          # one input sample, without the batch
    build: Callable[[], nn.Module]
    configs: tuple[str, ...] = tuple(CONFIGS)
    num_classes: int = 10


WORKLOADS = {w.name: w for w in (
    Workload("vit", "mini-ViT (timm; width 192, depth 6, 3 heads, patch 7, no qkv bias) on 1×28×28, batch 128",
             128, (1, 28, 28), lambda: build_model("vit", (1, 28, 28), 10)),
    Workload("resnet18", "ResNet-18 (timm, 3×3 stem, no max-pool) on 1×28×28, batch 32",
             32, (1, 28, 28), lambda: build_model("resnet18", (1, 28, 28), 10)),
    Workload("resnet18-stem", "ResNet-18 (timm, ImageNet stem: 7×7 stride 2 + max-pool, as "
             "configs/fmnist_resnet18.yaml) on 1×28×28, batch 128", 128, (1, 28, 28),
             lambda: build_model("resnet18", (1, 28, 28), 10, small_stem=False)),
    Workload("block512", "one timm ViT Block, width 512, 8 heads, sequence 64, batch 32 (+ mean pool, Linear head)",
             32, (64, 512), lambda: transformer_block(512, 8)),
    Workload("block1024", "one timm ViT Block, width 1024, 16 heads, sequence 64, batch 16 (+ mean pool, Linear head)",
             16, (64, 1024), lambda: transformer_block(1024, 16)),
)}


class Trainer:
    """A model, AdamW, one fixed random batch and, for a low-rank config, the OIALR controller (converted at once:
    ``warmup_steps=0, cutoff=0``, so every converted layer has rank ``ceil(f·min(m, n))``; the head stays dense).

    :meth:`step` is one training step: zero_grad, forward, cross-entropy, backward, ``optimizer.step()``. It does not
    call ``controller.step()``: basis updates are timed on their own.
    """

    def __init__(self, workload: Workload, config: Config, seed: int = 0, device: str = "cpu") -> None:
        torch.manual_seed(seed)
        self.config = config
        self.model = workload.build().to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.controller = None
        if config.rank_fraction is not None:
            settings = oialr.OIALRConfig(warmup_steps=0, cutoff=0.0, rank_fraction=config.rank_fraction)
            self.controller = oialr.OIALR(self.model, self.optimizer, settings)
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(workload.batch, *workload.sample_shape, generator=generator).to(device)
        self.y = torch.randint(0, workload.num_classes, (workload.batch,), generator=generator).to(device)

    def step(self) -> None:
        with self.config.path_context():
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.optimizer.step()
