"""OIALR: the training controller — full-rank warm-up, transition to ``U Σ Vᵀ``, periodic basis updates."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn

from . import basis_updates, budget, distributed, growth, health, optim_state
from ._checks import check_same_settings, check_state_version
from .auto_transition import PlateauRule
from .config import OIALRConfig, config_or_default
from .convert import convert_layer
from .factorize import placeholder_factors, transition_factors
from .layers import LowRankLayer
from .output_sample import OutputSampler
from .stability import StabilityTracker
from .targets import (LayerInfo, as_matrix, find_layers, format_table, layer_sizes, layer_weight, no_target_message,
                      trainable_params)
from .warmup import WarmupEnd
from .wrapper import Rewrapped

STATE_VERSION = 1


class OIALR:
    """Orthogonality-Informed Adaptive Low-Rank training of ``model`` with ``optimizer``.

    Call :meth:`step` once after every ``optimizer.step()``::

        ctl = OIALR(model, optimizer, OIALRConfig(warmup_steps=1000, update_every=100, cutoff=0.1))
        for x, y in data:
            loss_fn(model(x), y).backward()
            optimizer.step(); optimizer.zero_grad()
            ctl.step()

    The algorithm, for every converted weight ``W (m×n)``:

    1. steps ``1 … T₀-1``: ordinary full-rank training (``T₀ = warmup_steps``; with ``warmup_steps="auto"``, ``T₀``
       is the first stability sample at which :class:`oialr.PlateauRule` fires: :class:`oialr.warmup.WarmupEnd`);
    2. inside step ``T₀`` (:meth:`transition`): ``W = U diag(s) Vᵀ``; keep ``r`` values (``s_i >= cutoff·s_1``, at
       most ``ceil(rank_fraction·min(m, n))``); the layer becomes ``U (m×r)``, ``Σ = diag(s_1..s_r)``, ``V (n×r)``,
       with ``U``, ``V`` frozen and ``Σ`` (a full ``r×r`` matrix) in ``W``'s place in the optimizer;
    3. every ``update_every`` steps after that (:meth:`update_bases`): ``Σ = u diag(s) vᵀ``; ``U ← U u``,
       ``V ← V v``, ``Σ ← diag(s)`` (``U Σ Vᵀ`` unchanged), then drop the trailing values ``s_i < cutoff·s_1``.

    Beyond the paper (:class:`OIALRConfig`): ``stored_budget`` allocates the ranks across layers at 2 and 3
    (:mod:`oialr.budget`), weighing each component by its share of the layer's output in the training forward of the
    step the allocation runs in (:mod:`oialr.output_sample`); ``augment_bases`` widens ``U``, ``V`` after each cut
    with the gradient directions they miss, recorded in the backward pass of the step before the update
    (:mod:`oialr.growth`); ``train_bases`` also trains ``U`` and ``V`` (their optimizer state carried like ``Σ``'s).

    The maths is in :mod:`oialr.factorize`, the optimizer state of ``Σ`` is carried as :mod:`oialr.optim_state`
    says. :meth:`state_dict` holds the step counter, the transition, the ranks and the automatic transition's
    samples: everything beyond the model's and the optimizer's own state dicts.

    Under ``torch.distributed`` (every process builds the same model, optimizer and controller) the SVDs of the
    transition and of every basis update are computed by process 0 and broadcast (:mod:`oialr.distributed`), so
    ``U``, ``Σ``, ``V``, the ranks and the rotations are identical on every process. Pass the bare model and
    ``wrap=lambda m: DistributedDataParallel(m, ...)``, and run the forward through :attr:`wrapped_model`: the
    wrapper is rebuilt only when the controller creates new Parameter objects (see ``docs/DISTRIBUTED.md``).
    Sharded instead (FSDP2): shard the model with :func:`oialr.sharding.shard_targets` (every converted layer its
    own unit, then the root), build the optimizer, and pass ``shard=fully_shard`` (or the ``functools.partial`` of
    it that sharded the model): each layer is gathered whole only while the controller changes it, and a layer whose
    Parameters change becomes a new unit (:mod:`oialr.sharding`); a ``stored_budget`` first gathers every target
    weight in turn for the transition's allocation. Not with ``augment_bases`` or ``warmup_steps="auto"``.

    ``tracker``: with ``warmup_steps="auto"``, a :class:`oialr.StabilityTracker` you already step (before
    ``ctl.step()``) to record stability for the whole run; the transition then reads its samples of the layers to
    convert instead of sampling them a second time. It must sample at ``config.auto``'s ``every`` and ``lag``.

    ``total_steps``: the run's optimizer steps, when known. Needed for ``warmup_steps`` given as a fraction of the
    run; a run that reaches it still in the full-rank warm-up gets one warning.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: OIALRConfig | None = None, *,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, tracker: StabilityTracker | None = None,
                 total_steps: int | None = None, shard: Callable[[nn.Module], nn.Module] | None = None):
        self._wrapper = Rewrapped(model, wrap)          # refuses a model that is itself a DDP wrapper
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.config = config_or_default(config)
        self.total_steps = total_steps
        self.layer_infos: list[LayerInfo] = find_layers(model, self.config)
        self.targets = [info.name for info in self.layer_infos if info.convert]
        if not self.targets:
            raise ValueError(no_target_message(model, self.layer_infos))
        for name in self.targets:
            if optim_state.find_group(optimizer, layer_weight(model, name)[1]) is None:
                raise ValueError(f"the weight of layer {name!r} trains (requires_grad=True) but is not in the "
                                 "optimizer; add it to the optimizer or list the layer in exclude_modules")
        self._sharded = None if shard is None else _sharded_layers(model, self.targets, self.config, shard, wrap)
        if self.config.stored_budget is not None:
            budget.check_budget([i.shape for i in self.layer_infos if i.convert], self.config.stored_budget,
                                self.config.min_rank)
        self.dense_trainable_params = trainable_params(model)
        self._recorder = growth.GradientRecorder() if self.config.augment_bases else None
        self._outputs = OutputSampler() if self.config.stored_budget is not None else None
        self.cut_ranks: dict[str, int] = {}             # the ranks the last transition or cut kept (before growth)
        self.step_count = 0
        self.transition_step: int | None = None
        self.transition_reason: str | None = None
        self.warmup = WarmupEnd(model, self.config, self.targets, tracker, total_steps)
        if self.warmup.steps == 0:
            self.transition("warmup_steps=0: converted when the controller was built")
        self._arm_recording()

    # ------------------------------------------------------------------ schedule
    @property
    def phase(self) -> str:
        return "full-rank" if self.transition_step is None else "low-rank"

    @property
    def tracker(self) -> StabilityTracker | None:
        """The stability tracker an automatic transition reads (None after the transition or without "auto")."""
        return self.warmup.tracker

    @property
    def rule(self) -> PlateauRule | None:
        """The :class:`oialr.PlateauRule` of ``warmup_steps="auto"`` (else None)."""
        return self.warmup.rule

    @property
    def wrapped_model(self) -> nn.Module:
        """The module to run the training forward through: ``wrap(model)``, built on first use and again after the
        controller replaced Parameter objects (the transition, a rank change, a restore); ``model`` without ``wrap``.
        Read it at every step (:class:`oialr.wrapper.Rewrapped`). A wrapper built while ``augment_bases`` records
        gradients sees the bases frozen (DDP must not sync them)."""
        if self._recorder is None:
            return self._wrapper.module
        with self._recorder.paused():
            return self._wrapper.module

    def step(self) -> None:
        """Advance one optimizer step; run the transition or a basis update when the schedule says so. Raises
        :class:`oialr.DegenerateStateError` (the step not counted, nothing changed) for a non-finite or zero state."""
        self.step_count += 1
        try:
            if self.transition_step is None:
                reason = self.warmup.reason(self.step_count, self.targets)
                if reason:
                    self.transition(reason)
            elif (self.step_count - self.transition_step) % self.config.update_every == 0:
                self.update_bases()
        except health.DegenerateStateError:
            self.step_count -= 1
            raise
        self._arm_recording()

    def _arm_recording(self) -> None:
        """Hook the next step only where the event it ends in reads what the hooks record: the output rows of the
        layers (:class:`oialr.output_sample.OutputSampler`) for a ``stored_budget``'s allocation at the transition
        (with ``warmup_steps="auto"``: at every stability sample, where it may fire) and, with ``augment_bases``, at
        every update; the bases' gradients (:mod:`oialr.growth`) with ``augment_bases`` before every update. The
        other steps run without hooks."""
        following = self.step_count + 1
        if self.transition_step is None:
            update = False
            allocates = following % self.config.auto.every == 0 if self.warmup.steps == "auto" \
                else following >= self.warmup.steps
        else:
            update = (following - self.transition_step) % self.config.update_every == 0
            allocates = update and self.config.augment_bases
        if self._outputs is not None:
            if allocates:
                self._outputs.attach(self.model, self.targets)
            else:
                self._outputs.detach()
        if self._recorder is not None and update:
            self._recorder.start(self.lowrank_layers())

    def lowrank_layers(self) -> dict[str, LowRankLayer]:
        """The factored layers by qualified name (empty before the transition)."""
        if self.transition_step is None:
            return {}
        return {name: self.model.get_submodule(name) for name in self.targets}

    # ------------------------------------------------------------------ the two events
    @torch.no_grad()
    def transition(self, reason: str, ranks: dict[str, int] | None = None) -> None:
        """Factor every target weight (:func:`oialr.factorize.transition_factors`; ranks from the config), or,
        restoring a saved run, give every target the saved rank ``ranks`` with placeholder factors (no SVD: the
        values are loaded next). One layer at a time: its dense weight and optimizer state are freed before the next
        layer's SVD (a ``stored_budget`` first computes every weight's singular values, to allocate the ranks). A
        fresh transition first checks every weight (:func:`oialr.health.check_layers`: finite, not all zero) and
        raises :class:`oialr.DegenerateStateError` before changing any."""
        if ranks is None:
            health.check_weights(self.model, self.targets, self.step_count, shards=self._sharded is not None)
        optim_state.warn_if_unknown(self.optimizer)
        chosen = basis_updates.transition_ranks(self.model, self.targets, self.config, self._whole,
                                                self._outputs and self._outputs.rows) if ranks is None else None
        for name in self.targets:
            with self._gathered(name):                  # sharded: this layer's full values, sharded again after
                module, weight = layer_weight(self.model, name)
                matrix = as_matrix(module, weight)
                if ranks is not None:
                    factors = placeholder_factors(*matrix.shape, ranks[name], like=weight)
                else:                                   # process 0's SVD, adopted by every process
                    factors = transition_factors(matrix, self.config, chosen and chosen[name]) \
                        if distributed.is_source() else None
                    factors = distributed.broadcast_factors(factors, matrix.shape, like=weight)
                layer = convert_layer(self.model, name, factors)[1]
                if self.config.train_bases:
                    layer.lowrank_U.requires_grad_(True)
                    layer.lowrank_V.requires_grad_(True)
                optim_state.enter_lowrank(self.optimizer, weight, layer.lowrank_S, layer.lowrank_U, layer.lowrank_V,
                                          lambda t, module=module: as_matrix(module, t))
                del module, weight, matrix, factors, layer
        self._free_replaced()
        self._wrapper.invalidate()                      # new Parameters: the wrapper is rebuilt on next use
        if self._outputs is not None:                   # its hooks were on the dense layers just replaced
            self._outputs.detach()
        self.transition_step = self.step_count
        self.transition_reason = reason
        self.cut_ranks = {name: layer.rank for name, layer in self.lowrank_layers().items()}
        self.warmup.finish()

    @torch.no_grad()
    def update_bases(self, grow: bool = True) -> None:
        """Basis update of every factored layer (:func:`oialr.basis_updates.update_all`: ranks by the cutoff or
        the ``stored_budget``, computed by process 0 and broadcast under ``torch.distributed``). With
        ``augment_bases`` the bases are then widened by the gradient recorded since the step before; ``grow=False``
        skips that, e.g. as a run's last call so that the final model keeps only the cut ranks. Every layer's ``U``,
        ``Σ``, ``V`` are checked first (finite, none all zero): :class:`oialr.DegenerateStateError`, and no layer
        changed, otherwise."""
        layers = self.lowrank_layers()
        health.check_factors(layers, self.step_count, shards=self._sharded is not None)
        optim_state.warn_if_unknown(self.optimizer)
        if self._sharded is not None:                   # one layer at a time (no growth: the layers are independent)
            for name in layers:
                with self._gathered(name) as layer:
                    self.cut_ranks[name] = basis_updates.update_all({name: layer}, self.optimizer, self.config,
                                                                    None)[1][name]
            self._free_replaced()
            return
        grads = self._recorder.stop() if self._recorder is not None else {}
        replaced, self.cut_ranks = basis_updates.update_all(layers, self.optimizer, self.config,
                                                            grads if grow and self._recorder is not None else None,
                                                            self._outputs and self._outputs.rows)
        if replaced:
            self._wrapper.invalidate()

    def _gathered(self, name: str):
        """Sharded: the layer ``name`` with full values inside the block (:meth:`oialr.sharding.ShardedLayers.
        gathered`); else the factored layer as it is (None before the transition)."""
        if self._sharded is None:
            return nullcontext(self.lowrank_layers().get(name))
        return self._sharded.gathered(name, self.optimizer)

    def _whole(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s full value: sharded, all-gathered (every process calls it); else ``t``."""
        return t if self._sharded is None else self._sharded.whole(t)

    def _free_replaced(self) -> None:
        if self._sharded is not None:
            self._sharded.free_replaced()

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        """Phase, step, parameter counts and, per layer, rank and sizes (plain values). ``dense_share``: the share
        of the stored parameters outside the weight matrices OIALR converts (their ``U``, ``Σ``, ``V`` after the
        transition): biases, norms, embeddings and the layers kept dense."""
        ranks = {name: layer.rank for name, layer in self.lowrank_layers().items()}
        layers = layer_sizes(self.layer_infos, ranks, self.config.train_bases)
        stored = sum(p.numel() for p in self.model.parameters())
        converted = sum(layer["stored_params"] for layer in layers.values())
        return {
            "phase": self.phase,
            "step": self.step_count,
            "transition_step": self.transition_step,
            "transition_reason": self.transition_reason,
            "trainable_params": trainable_params(self.model),
            "dense_trainable_params": self.dense_trainable_params,
            "stored_params": stored,
            "dense_share": 1 - converted / stored if stored else 0.0,
            **budget.stored_fractions([i.shape for i in self.layer_infos if i.convert], self.config.stored_budget,
                                      list(ranks.values()),
                                      [self.cut_ranks[name] for name in self.targets] if self.cut_ranks else []),
            "layers": layers,
        }

    def table(self) -> str:
        """A readable table of every eligible layer (shape, rank, parameters, why a layer stays dense) and of every
        other module holding parameters (kind ``other``: embeddings, norms, ..., with the reason)."""
        ranks = {name: layer.rank for name, layer in self.lowrank_layers().items()}
        return format_table(self.layer_infos, ranks)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step counter, transition step, ranks, config (plain values only)."""
        return {
            "version": STATE_VERSION,
            "step": self.step_count,
            "transition_step": self.transition_step,
            "transition_reason": self.transition_reason,
            "ranks": {name: layer.rank for name, layer in self.lowrank_layers().items()},
            "cut_ranks": dict(self.cut_ranks),
            **self.warmup.state_dict(),                 # "tracker", "rule"
            "dense_trainable_params": self.dense_trainable_params,
            "config": self.config.to_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved run. Give the model and optimizer their state dicts *after* this call: it rebuilds the
        factored layers with the saved ranks (values are overwritten by ``model.load_state_dict``) and puts each
        ``Σ`` in the optimizer where the saved run had it."""
        check_state_version("OIALR", state, STATE_VERSION)
        saved = OIALRConfig.from_dict(state["config"]).to_dict()
        check_same_settings("OIALR run", saved, {k: v for k, v in self.config.to_dict().items() if k in saved})
        ranks = state["ranks"]
        if state["transition_step"] is not None and set(ranks) != set(self.targets):
            raise ValueError("the saved run converted other layers than this controller would: saved "
                             f"{sorted(set(ranks) - set(self.targets))} not here, here "
                             f"{sorted(set(self.targets) - set(ranks))} not saved; build the model and OIALRConfig "
                             "as in the saved run")
        if self.transition_step is not None and state["transition_step"] is None:
            raise ValueError("cannot restore a full-rank (pre-transition) state into a controller that already "
                             "converted the model; build a fresh model, optimizer and controller")
        self.warmup.load_state_dict(state)
        if self._recorder is not None:
            self._recorder.stop()
        if state["transition_step"] is not None and self.transition_step is None:
            self.transition(state["transition_reason"], ranks)
        elif state["transition_step"] is not None:
            for name, layer in self.lowrank_layers().items():
                if layer.rank != ranks[name]:
                    with self._gathered(name) as layer:
                        if basis_updates.restore_ranks({name: layer}, self.optimizer, ranks, self.config.train_bases):
                            self._wrapper.invalidate()
            self._free_replaced()
        self.step_count = state["step"]
        self.transition_step = state["transition_step"]
        self.transition_reason = state["transition_reason"]
        self.dense_trainable_params = state["dense_trainable_params"]
        self.cut_ranks = dict(state.get("cut_ranks", ranks))
        self._arm_recording()


def _sharded_layers(model: nn.Module, targets: list[str], config: OIALRConfig, shard, wrap):
    """The :class:`oialr.sharding.ShardedLayers` of ``shard=``, after refusing what it does not support (imported
    only here: training without ``shard`` never imports it)."""
    if wrap is not None:
        raise ValueError("pass wrap= (a wrapper such as DDP) or shard= (FSDP2), not both")
    unsupported = [what for what, on in (
        ("augment_bases (it records the bases' gradients through hooks, which FSDP2's sharded gradients bypass)",
         config.augment_bases),
        ('warmup_steps="auto" (it samples every whole weight)', config.warmup_steps == "auto")) if on]
    if unsupported:
        raise ValueError(f"OIALR with shard= (FSDP2) does not support {'; '.join(unsupported)}; train with DDP "
                         "(wrap=oialr.distributed.ddp) or leave them unset")
    from .sharding import ShardedLayers
    return ShardedLayers(model, targets, shard)
