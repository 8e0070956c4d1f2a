"""OIALR inside the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[OIALRCallback(config)])``.

Importing this module registers GPT-2's ``Conv1D`` layers (:mod:`oialr.integrations.hf_conv1d`). The callback
builds :class:`oialr.OIALR` on the Trainer's model and the torch optimizer inside accelerate's wrapper
(so ``Σ``'s Adam state is carried across basis updates), steps it once per optimizer step (``on_step_end``, which
the Trainer calls after the optimizer step, the scheduler step and ``zero_grad`` of the last micro-batch of a
gradient-accumulation cycle), and writes its state as ``oialr_state.pt`` into every checkpoint folder.

Resuming, ``trainer.train(resume_from_checkpoint=...)``: the Trainer loads the saved weights into the still dense
model (before any callback runs), then builds the optimizer over the dense parameters and loads the saved optimizer
state by position. The callback therefore catches the factored weights at that first load
(:class:`~oialr.integrations._resume.FactoredWeightCatcher`), and at ``on_train_begin`` takes a copy of the loaded
optimizer state, rebuilds the factored layers from ``oialr_state.pt`` (each ``Σ`` where the saved run had it, i.e.
at its dense weight's position), loads the caught weights, and loads the optimizer state again: training continues
bit-for-bit.

Under ``torchrun`` the Trainer's DistributedDataParallel wrapper, built by accelerate over the dense parameters, is
kept: it goes on reducing the gradients of every parameter it knows (embeddings, norms, the dense layers), while
:class:`~oialr.integrations._grad_sync.FactorGradSync` averages each trained factor's gradient itself, and the
controller computes the SVDs on process 0 and broadcasts them. The dense weights the wrapper was built over stay in
its memory and are reduced as zeros (no communication saving). ``load_best_model_at_end`` is refused (the best
checkpoint may hold other ranks than the final model).
"""
from __future__ import annotations

import os

import torch

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError("oialr.integrations.transformers needs the Hugging Face packages: pip install oialr[hf]") \
        from error

from .. import distributed
from ..config import OIALRConfig, config_or_default
from ..controller import OIALR
from ..files import save_torch
from . import hf_conv1d
from ._grad_sync import FactorGradSync
from ._resume import FactoredWeightCatcher, unwrap_optimizer

hf_conv1d.register()        # GPT-2's transformers.pytorch_utils.Conv1D is a layer type OIALR converts

STATE_FILE = "oialr_state.pt"


def _check_distributed(args, model) -> None:
    """Under several processes the dense weights accelerate's DistributedDataParallel holds stop getting gradients
    at the transition, which it accepts only with ``find_unused_parameters=True`` (the Trainer's choice unless told
    otherwise or activation checkpointing is on)."""
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None:
        find_unused = not (getattr(model, "is_activation_checkpointing", False)
                           or getattr(args, "activation_checkpointing", False))
    if args.world_size > 1 and (not find_unused or args.ddp_static_graph):
        raise ValueError(f"OIALRCallback on {args.world_size} processes needs ddp_find_unused_parameters=True and "
                         "ddp_static_graph unset: after the transition the dense weights that DistributedDataParallel "
                         "was built over get no gradient (activation checkpointing, which needs "
                         "find_unused_parameters=False, is not supported with it)")


class OIALRCallback(TrainerCallback):
    """Train the Trainer's model with OIALR. ``controller`` is the :class:`oialr.OIALR` once training has begun
    (``callback.controller.summary()``, ``.table()``)."""

    def __init__(self, config: OIALRConfig | None = None):
        self.config = config_or_default(config)
        self.controller: OIALR | None = None
        self._catcher: FactoredWeightCatcher | None = None
        self._grad_sync: FactorGradSync | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _check_distributed(args, model)
        if args.load_best_model_at_end:
            raise ValueError("OIALRCallback does not support load_best_model_at_end=True: the best checkpoint's "
                             "factored layers may have other ranks than the model at the end; reload it in a fresh "
                             "model and Trainer with resume_from_checkpoint instead")
        if model is None:
            raise ValueError("OIALRCallback needs Trainer(model=...); model_init is not supported")
        self._catcher = FactoredWeightCatcher(model, self.config)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_distributed(args, model)
        if self.controller is not None:
            raise ValueError("an OIALRCallback trains one run: build a new model, Trainer and OIALRCallback for "
                             "another trainer.train() call (to resume, pass resume_from_checkpoint to a new Trainer)")
        catcher, self._catcher, inner = self._catcher, None, unwrap_optimizer(optimizer)
        if state.global_step == 0:
            self.controller = OIALR(model, inner, self.config)
            if catcher is not None:
                catcher.restore(None)
            self._start_grad_sync()
            return
        if catcher is None:
            raise ValueError("to resume, pass OIALRCallback to Trainer(callbacks=[...]) rather than add_callback(): "
                             "it must be there when the Trainer is built to receive the checkpoint's factored layers")
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resuming at step {state.global_step}, OIALRCallback found no {path}; resume "
                                    f"from a checkpoint folder in args.output_dir ({args.output_dir}) that a Trainer "
                                    "with OIALRCallback wrote")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["step"] != state.global_step:
            raise ValueError(f"{path} holds OIALR's state at step {saved['step']}, the checkpoint is at step "
                             f"{state.global_step}")
        optimizer_state = inner.state_dict()     # loaded by position into the dense parameters: Σ's state where
        self.controller = OIALR(model, inner, self.config)          # each Σ will be once the model is factored
        self.controller.load_state_dict(saved)
        catcher.restore(self.controller)
        inner.load_state_dict(optimizer_state)
        self._start_grad_sync()

    def _start_grad_sync(self) -> None:
        self._grad_sync = FactorGradSync(self.controller) if distributed.is_distributed() else None

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.step()
        if self._grad_sync is not None:
            self._grad_sync.attach()                    # the transition and rank changes create new Σ Parameters

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_torch(os.path.join(folder, STATE_FILE), self.controller.state_dict())
