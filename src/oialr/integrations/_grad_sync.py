"""Averaging the factors' gradients over the processes when a framework's DistributedDataParallel wrapper cannot.

A framework that builds the ``DistributedDataParallel`` wrapper itself (the Hugging Face Trainer, through accelerate)
keeps the wrapper it built over the dense parameters: the factor Parameters the controller creates are not among
them, so their gradients would differ between processes. :class:`FactorGradSync` averages the gradient of each
trained factor (``Σ``; ``U`` and ``V`` too with ``train_bases``) as soon as it is accumulated (a
``post_accumulate_grad`` hook): ``g ← (1/P) Σ_p g_p``. Under gradient accumulation it runs at every micro-batch;
that is exact, since the part accumulated before is already equal on every process: ``mean_p(ḡ₁ + g₂ₚ) = ḡ₁ + ḡ₂``.
The dense weights the wrapper still holds get no gradient after the transition, which DistributedDataParallel
accepts only with ``find_unused_parameters=True``.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from ..controller import OIALR


def _average(param: Tensor) -> None:
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())


class FactorGradSync:
    """Keeps one averaging hook on every trained factor of ``ctl``'s factored layers; call :meth:`attach` after
    every controller step (a rank change creates new Parameters)."""

    def __init__(self, ctl: OIALR):
        self.ctl = ctl
        self._hooked: dict[int, tuple[Tensor, object]] = {}
        self.attach()

    def attach(self) -> None:
        trained = {id(p): p for layer in self.ctl.lowrank_layers().values()
                   for p in (layer.lowrank_U, layer.lowrank_S, layer.lowrank_V) if p.requires_grad}
        for key in set(self._hooked) - set(trained):
            self._hooked.pop(key)[1].remove()
        for key, param in trained.items():
            if key not in self._hooked:
                self._hooked[key] = (param, param.register_post_accumulate_grad_hook(_average))
