"""Resuming a factored run inside a framework that loads a checkpoint's weights before the controller exists.

The Hugging Face ``Trainer`` and Lightning both load the saved model weights into the freshly built model, which is
still dense, before any callback can rebuild the factored layers. :class:`FactoredWeightCatcher` hooks the model's
``load_state_dict``: it takes the factored layers' entries (``*.lowrank_U``, ``*.lowrank_S``, ``*.lowrank_V``) out of
the incoming state dict, lets the dense weights they replaced keep their current values (so a strict load passes),
and loads the caught entries once the controller has given the model its saved structure (:meth:`restore`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import OIALRConfig
from ..controller import OIALR
from ..targets import find_layers, layer_weight

PREFIX = "lowrank_"        # every factored layer's own Parameters carry it (oialr.layers)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): both keep it as ``.optimizer`` and share its ``param_groups`` and ``state``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class FactoredWeightCatcher:
    """Catches the factored layers' weights of any state dict loaded into ``model`` while it is dense.

    Attach it before the framework loads the checkpoint; after ``ctl.load_state_dict(saved)`` has rebuilt the
    factored layers, :meth:`restore` loads what was caught, or raises if the checkpoint does not fit.
    """

    def __init__(self, model: nn.Module, config: OIALRConfig):
        self.model, self.config = model, config
        self.entries: dict[str, Tensor] = {}
        self._dense_keys: set[str] = set()
        self._handle = model.register_load_state_dict_pre_hook(self._catch)

    def _catch(self, module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
        own = module.state_dict(keep_vars=True)
        caught = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in own
                  and k.rpartition(".")[2].startswith(PREFIX)]
        if not caught:
            return
        self._dense_keys = set(own)
        self.entries.update({k[len(prefix):]: state_dict.pop(k) for k in caught})
        key_of = {id(t): k for k, t in own.items()}
        for info in find_layers(module, self.config):
            if not info.convert:
                continue
            weight = layer_weight(module, info.name)[1]
            if id(weight) in key_of:                        # the dense weight the factors replace: keep it as it is
                state_dict.setdefault(prefix + key_of[id(weight)], weight.detach())

    def restore(self, ctl: OIALR | None) -> None:
        """Load the caught weights into the model ``ctl`` has just restructured (``None``: nothing was restored,
        so nothing may have been caught); stop catching."""
        self._handle.remove()
        if not self.entries:
            return
        if ctl is None or ctl.transition_step is None:
            raise ValueError(f"the checkpoint loaded into the model holds factored layers ({sorted(self.entries)[0]}"
                             ", ...) but no OIALR state after the transition was restored with it; resume from a "
                             "checkpoint written by the same OIALRCallback")
        new_keys = set(self.model.state_dict()) - self._dense_keys
        missing, unexpected = sorted(new_keys - set(self.entries)), sorted(set(self.entries) - new_keys)
        if missing or unexpected:
            raise ValueError("the checkpoint's factored layers do not match the ones OIALR rebuilt from its saved "
                             f"state: missing {missing[:5]}, unexpected {unexpected[:5]}; build the model and the "
                             "OIALRConfig as in the saved run")
        self.model.load_state_dict(self.entries, strict=False)
        self.entries = {}
