"""OIALR inside Lightning 2.x: ``lightning.Trainer(..., callbacks=[OIALRCallback(config)])``.

The callback builds :class:`oialr.OIALR` on the LightningModule and its one optimizer (``trainer.optimizers[0]``)
at ``on_fit_start``, and steps it once per optimizer step: at the end of a batch it steps the controller until its
count equals ``trainer.global_step`` (Lightning's count of optimizer steps), so with ``accumulate_grad_batches`` the
micro-batches in between advance nothing. Lightning runs its checkpoint callbacks last, so a checkpoint saved at the
end of a batch holds the controller's state after that step; the state is the callback's ``state_dict``.

Resuming, ``trainer.fit(model, ckpt_path=...)``, Lightning's order of events is: the callbacks' ``setup``; the
saved weights loaded into the still dense module (strict); the callbacks' ``load_state_dict``; the optimizer built
over the dense parameters; ``on_fit_start``; the saved optimizer state loaded by position. The callback catches the
factored weights at the strict load (:class:`~oialr.integrations._resume.FactoredWeightCatcher`, which keeps the
dense weights they replace so the load passes), and at ``on_fit_start`` rebuilds the factored layers from the saved
state, each ``Σ`` at its dense weight's position in the optimizer, then loads the caught weights; Lightning then
loads the optimizer state into the right parameters. None of it depends on the order of the callbacks.

Under DDP (``strategy="ddp_find_unused_parameters_true"``) the strategy's wrapper, built over the dense parameters,
is kept; :class:`~oialr.integrations._grad_sync.FactorGradSync` averages the trained factors' gradients and the
controller broadcasts process 0's SVDs, as under the Hugging Face Trainer.
"""
from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as error:
    raise ImportError("oialr.integrations.lightning needs Lightning 2.x: pip install oialr[lightning]") from error

from .. import distributed
from ..config import OIALRConfig, config_or_default
from ..controller import OIALR
from ._grad_sync import FactorGradSync
from ._resume import FactoredWeightCatcher, unwrap_optimizer


def _check_ddp(wrapper) -> None:
    """Several processes: the strategy's wrapper must be a DistributedDataParallel that tolerates the dense weights
    it was built over getting no gradient after the transition."""
    if not isinstance(wrapper, DistributedDataParallel):
        raise ValueError(f"OIALRCallback supports multi-process training with DistributedDataParallel only; the "
                         f"strategy wrapped the module in {type(wrapper).__name__}")
    if not wrapper.find_unused_parameters or wrapper.static_graph:
        raise ValueError("OIALRCallback on several processes needs DDP with find_unused_parameters=True (e.g. "
                         "Trainer(strategy=\"ddp_find_unused_parameters_true\")): after the transition the dense "
                         "weights the wrapper was built over get no gradient")


class OIALRCallback(Callback):
    """Train the LightningModule with OIALR. ``controller`` is the :class:`oialr.OIALR` once fitting has begun
    (``callback.controller.summary()``, ``.table()``)."""

    def __init__(self, config: OIALRConfig | None = None):
        self.config = config_or_default(config)
        self.controller: OIALR | None = None
        self._catcher: FactoredWeightCatcher | None = None
        self._saved: dict[str, Any] | None = None
        self._grad_sync: FactorGradSync | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.controller is not None:
            raise ValueError("an OIALRCallback trains one run: build a new module, Trainer and OIALRCallback for "
                             "another fit() (to resume, pass ckpt_path to fit)")
        self._catcher = FactoredWeightCatcher(pl_module, self.config)

    def on_fit_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"OIALRCallback trains a module with one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        if trainer.ckpt_path is not None and self._saved is None:
            raise ValueError(f"resuming from {trainer.ckpt_path}, which holds no OIALRCallback state; resume from a "
                             "checkpoint that a Trainer with OIALRCallback wrote")
        if distributed.is_distributed():
            _check_ddp(trainer.strategy.model)
        self.controller = OIALR(pl_module, unwrap_optimizer(trainer.optimizers[0]), self.config)
        if self._saved is not None:
            self.controller.load_state_dict(self._saved)
            self._saved = None
        self._catcher.restore(self.controller)
        self._catcher = None
        self._grad_sync = FactorGradSync(self.controller) if distributed.is_distributed() else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        while self.controller.step_count < trainer.global_step:
            self.controller.step()
        if self._grad_sync is not None:
            self._grad_sync.attach()                    # the transition and rank changes create new Σ Parameters

    def state_dict(self) -> dict[str, Any]:
        return {} if self.controller is None else self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict
