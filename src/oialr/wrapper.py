"""The training wrapper of a model whose Parameter objects get replaced (DDP, ``torch.compile``): rebuilt on demand."""
from __future__ import annotations

from typing import Callable

from torch import nn


class Rewrapped:
    """``wrap(model)``, built on first use of :attr:`module` and again after :meth:`invalidate`; ``model`` itself
    without ``wrap``.

    A wrapper such as ``DistributedDataParallel`` registers gradient hooks on the Parameters it saw when built; once
    OIALR replaces Parameters (the transition, a rank change, a restore) it must be rebuilt. Keep no reference to an
    old wrapper: its hooks live as long as it does.
    """

    def __init__(self, model: nn.Module, wrap: Callable[[nn.Module], nn.Module] | None):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise TypeError(f"model is a {type(model).__name__} wrapper, whose gradient sync would miss the Σ "
                            "Parameters OIALR creates; pass the bare module and let the controller (re)build the "
                            "wrapper: OIALR(ddp.module, optimizer, config, wrap=lambda m: DistributedDataParallel(m, "
                            "...)), then train through ctl.wrapped_model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if wrap is not None and not callable(wrap):
            raise TypeError(f"wrap must be a callable module -> wrapped module (or None), got {type(wrap).__name__}")
        self.model, self.wrap = model, wrap
        self._wrapped: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        if self.wrap is None:
            return self.model
        if self._wrapped is None:
            self._wrapped = self.wrap(self.model)
        return self._wrapped

    def invalidate(self) -> None:
        """The model's Parameter objects changed: build the wrapper again on next use."""
        self._wrapped = None
