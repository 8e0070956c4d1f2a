"""OIALR: the training controller — full-rank warm-up, transition to ``U Σ Vᵀ``, periodic basis updates."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import distributed, linalg, optim_state
from ._checks import check_state_version
from .config import OIALRConfig
from .convert import SUPPORTED, LayerInfo, convert_layer, find_layers, format_table
from .layers import LowRankLayer
from .stability import PlateauRule, StabilityTracker

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
       is the first stability sample at which :class:`oialr.PlateauRule` fires);
    2. inside step ``T₀`` (the transition): ``W = U diag(s) Vᵀ``; keep ``r`` values (``s_i >= cutoff·s_1``, at most
       ``ceil(rank_fraction·min(m, n))``); the layer becomes ``U (m×r)``, ``Σ = diag(s_1..s_r)``, ``V (n×r)``, with
       ``U``, ``V`` frozen and ``Σ`` (a full ``r×r`` matrix) in ``W``'s place in the optimizer;
    3. every ``update_every`` steps after that (basis update): ``Σ = u diag(s) vᵀ``; ``U ← U u``, ``V ← V v``,
       ``Σ ← diag(s)`` (``U Σ Vᵀ`` unchanged), then drop the trailing values ``s_i < cutoff·s_1`` with their columns.

    The optimizer state of ``Σ`` is carried as described in :mod:`oialr.optim_state`. The controller is stateless
    between steps apart from the step counter and the ranks, which :meth:`state_dict` saves.

    Under ``torch.distributed`` (every process builds the same model, optimizer and controller) the SVDs of the
    transition and of every basis update are computed by rank 0 and broadcast (:mod:`oialr.distributed`), so ``U``,
    ``Σ``, ``V``, the ranks and the rotations are identical on every process. Pass the bare model and
    ``wrap=lambda m: DistributedDataParallel(m, ...)``, and run the forward through :attr:`wrapped_model`: the
    wrapper is rebuilt only when the controller creates new Parameter objects (see ``docs/DISTRIBUTED.md``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: OIALRConfig | None = None, *,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise TypeError(f"model is a {type(model).__name__} wrapper, whose gradient sync would miss the Σ "
                            "Parameters OIALR creates; pass the bare module and let the controller (re)build the "
                            "wrapper: OIALR(ddp.module, optimizer, config, wrap=lambda m: DistributedDataParallel(m, "
                            "...)), then train through ctl.wrapped_model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if wrap is not None and not callable(wrap):
            raise TypeError(f"wrap must be a callable module -> wrapped module (or None), got {type(wrap).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self._wrap, self._wrapped = wrap, None
        self.config = config if config is not None else OIALRConfig()
        if not isinstance(self.config, OIALRConfig):
            raise TypeError(f"config must be an OIALRConfig, got {type(self.config).__name__}")
        self.layer_infos: list[LayerInfo] = find_layers(model, self.config)
        targets = [info for info in self.layer_infos if info.convert]
        if not targets:
            found = "\n".join(f"  {i.name} ({i.kind} {i.shape[0]}x{i.shape[1]}): {i.reason}" for i in self.layer_infos)
            raise ValueError(f"no layer of the model can be converted; OIALR converts {SUPPORTED}.\n"
                             + (f"Layers found and why they stay dense:\n{found}" if found else "None was found."))
        for info in targets:
            weight = _dense_weight(model, info.name)
            if optim_state.find_group(optimizer, weight) is None:
                raise ValueError(f"the weight of layer {info.name!r} trains (requires_grad=True) but is not in the "
                                 "optimizer; add it to the optimizer or list the layer in exclude_modules")
        self.dense_trainable_params = _trainable_params(model)
        self.step_count = 0
        self.transition_step: int | None = None
        self.transition_reason: str | None = None
        self._warned_optimizer = False
        self.tracker: StabilityTracker | None = None    # measures the targets until an automatic transition
        self.rule: PlateauRule | None = None
        if self.config.warmup_steps == "auto":
            self.tracker = StabilityTracker(model, every=self.config.stability_every, cutoff=self.config.cutoff,
                                            layers=[info.name for info in targets], lag=self.config.stability_lag)
            self.rule = self.config.auto_rule()
        elif self.config.warmup_steps == 0:
            self._transition("warmup_steps=0: converted when the controller was built")

    # ------------------------------------------------------------------ schedule
    @property
    def phase(self) -> str:
        return "full-rank" if self.transition_step is None else "low-rank"

    @property
    def wrapped_model(self) -> nn.Module:
        """The module to run the training forward through: ``wrap(model)``, built on first use and again after the
        controller replaced Parameter objects (the transition, a rank change, a restore); ``model`` without ``wrap``.
        Read it at every step and keep no reference to an old wrapper (its gradient hooks live as long as it does)."""
        if self._wrap is None:
            return self.model
        if self._wrapped is None:
            self._wrapped = self._wrap(self.model)
        return self._wrapped

    def step(self) -> None:
        """Advance one optimizer step; run the transition or a basis update when the schedule says so."""
        self.step_count += 1
        if self.transition_step is None:
            reason = self._warmup_over()
            if reason:
                self._transition(reason)
        elif (self.step_count - self.transition_step) % self.config.update_every == 0:
            self._update_bases()

    def _warmup_over(self) -> str | None:
        """Why the full-rank phase ends at this step, or None if it goes on."""
        if self.rule is None:
            return f"warmup_steps={self.config.warmup_steps} reached" \
                if self.step_count >= self.config.warmup_steps else None
        record = self.tracker.step()
        if record is None:
            return None
        reason = self.rule.reason if self.rule.update(self.step_count, record["network_stability"]) else None
        return distributed.broadcast_object(reason)     # rank 0 decides: every process switches at the same step

    def lowrank_layers(self) -> dict[str, LowRankLayer]:
        """The factored layers by qualified name (empty before the transition)."""
        if self.transition_step is None:
            return {}
        return {info.name: self.model.get_submodule(info.name) for info in self.layer_infos if info.convert}

    # ------------------------------------------------------------------ transition
    @torch.no_grad()
    def _transition(self, reason: str, ranks: dict[str, int] | None = None) -> None:
        """Factor every target weight (ranks from the config, or ``ranks`` when restoring a saved run)."""
        self._warn_unknown_optimizer()
        for info in self.layer_infos:                   # one layer at a time: its dense weight and optimizer state
            if not info.convert:                        # are freed before the next layer's SVD
                continue
            weight, layer = convert_layer(self.model, info.name, config=self.config,
                                          rank=None if ranks is None else ranks[info.name])
            if ranks is None:                           # fresh SVD: every process adopts rank 0's factors and rank
                distributed.broadcast_factors([layer])
            optim_state.enter_lowrank(self.optimizer, weight, layer.lowrank_S, layer.lowrank_U, layer.lowrank_V)
            del weight
        self._wrapped = None                            # new Parameters: the wrapper is rebuilt on next use
        self.transition_step = self.step_count
        self.transition_reason = reason
        self.tracker = None                             # its snapshots are no longer needed

    # ------------------------------------------------------------------ basis update
    @torch.no_grad()
    def _update_bases(self) -> None:
        """:func:`basis_update` of every factored layer, computed by rank 0 under ``torch.distributed`` and
        broadcast, then applied on every process: new factors, and ``Σ``'s optimizer state rotated by ``u``, ``v``."""
        self._warn_unknown_optimizer()
        layers = self.lowrank_layers()
        updates = [self._basis_update(name, layer) for name, layer in layers.items()] \
            if distributed.is_source() else None
        updates = distributed.broadcast_updates(updates, list(layers.values()))
        for layer, update in zip(layers.values(), updates):
            if update is None:
                continue
            U, S, V, u, v = update
            old_S = layer.lowrank_S
            layer.set_factors(U, S, V)
            optim_state.rotate(self.optimizer, old_S, layer.lowrank_S, u, v)
            if layer.lowrank_S is not old_S:            # rank changed: new Parameters, rebuild the wrapper
                self._wrapped = None

    def _basis_update(self, name: str, layer: LowRankLayer) -> tuple[Tensor, ...] | None:
        """The new factors and rotations of one layer, or None (with a warning) when its ``Σ`` is not finite."""
        if not torch.isfinite(layer.lowrank_S).all():
            warnings.warn(f"OIALR: Σ of layer {name!r} has non-finite entries at step {self.step_count}; "
                          "its basis update is skipped (the factors are left as they are)", stacklevel=4)
            return None
        return basis_update(layer.lowrank_U, layer.lowrank_S, layer.lowrank_V, self.config)

    def _warn_unknown_optimizer(self) -> None:
        if optim_state.optimizer_kind(self.optimizer) is None and not self._warned_optimizer:
            self._warned_optimizer = True
            warnings.warn(f"OIALR does not know how to carry {type(self.optimizer).__name__} state across basis "
                          "changes; Σ gets fresh optimizer state at the transition and at every basis update "
                          "(known: Adam, AdamW, SGD)", stacklevel=4)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        """Phase, step, parameter counts and, per layer, rank and sizes (plain values)."""
        layers = {}
        lowrank = self.lowrank_layers()
        for info in self.layer_infos:
            if not info.convert:
                continue
            m, n = info.shape
            r = lowrank[info.name].rank if info.name in lowrank else min(m, n)
            layers[info.name] = {
                "rank": r, "full_rank": min(m, n), "shape": [m, n], "dense_params": m * n,
                "trainable_params": r * r if info.name in lowrank else m * n,
                "stored_params": r * (m + n + r) if info.name in lowrank else m * n,
            }
        params = list(self.model.parameters())
        return {
            "phase": self.phase,
            "step": self.step_count,
            "transition_step": self.transition_step,
            "transition_reason": self.transition_reason,
            "trainable_params": _trainable_params(self.model),
            "dense_trainable_params": self.dense_trainable_params,
            "stored_params": sum(p.numel() for p in params),
            "layers": layers,
        }

    def table(self) -> str:
        """A readable table of every eligible layer: shape, rank, parameters, why a layer stays dense."""
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
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
            "rule": None if self.rule is None else self.rule.state_dict(),
            "dense_trainable_params": self.dense_trainable_params,
            "config": self.config.to_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved run. Give the model and optimizer their state dicts *after* this call: it rebuilds the
        factored layers with the saved ranks (values are overwritten by ``model.load_state_dict``) and puts each
        ``Σ`` in the optimizer where the saved run had it."""
        check_state_version("OIALR", state, STATE_VERSION)
        targets = {info.name for info in self.layer_infos if info.convert}
        ranks = state["ranks"]
        if state["transition_step"] is not None and set(ranks) != targets:
            raise ValueError("the saved run converted other layers than this controller would: saved "
                             f"{sorted(set(ranks) - targets)} not here, here {sorted(targets - set(ranks))} not saved; "
                             "build the model and OIALRConfig as in the saved run")
        if self.transition_step is not None and state["transition_step"] is None:
            raise ValueError("cannot restore a full-rank (pre-transition) state into a controller that already "
                             "converted the model; build a fresh model, optimizer and controller")
        if state["transition_step"] is not None:
            if self.transition_step is None:
                self._transition(state["transition_reason"], ranks)
            else:
                for name, layer in self.lowrank_layers().items():
                    if _resize(self.optimizer, layer, ranks[name]):
                        self._wrapped = None
        if (state["rule"] is None) != (self.rule is None):
            raise ValueError("the saved run and this controller disagree on warmup_steps='auto'; build the "
                             "OIALRConfig as in the saved run")
        if self.rule is not None:
            self.rule.load_state_dict(state["rule"])
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])
        self.step_count = state["step"]
        self.transition_step = state["transition_step"]
        self.transition_reason = state["transition_reason"]
        self.dense_trainable_params = state["dense_trainable_params"]


def basis_update(U: Tensor, S: Tensor, V: Tensor, config: OIALRConfig) -> tuple[Tensor, ...]:
    """One basis update of ``W = U Σ Vᵀ`` (computed in float64, outside autocast).

    Re-orthonormalize a drifted basis (``U = Q R`` -> ``U ← Q``, ``Σ ← R Σ``; likewise ``V``, ``Σ ← Σ Rᵀ``), then
    ``Σ = u diag(s) vᵀ`` and keep ``k`` values (:func:`linalg.select_rank` with the current rank as the reference):
    returns ``U u[:, :k]``, ``diag(s[:k])``, ``V v[:, :k]`` and the full ``u``, ``v`` (``r×r``, for the optimizer).
    """
    with torch.autocast(device_type=S.device.type, enabled=False):
        U64, S64, V64 = U.double(), S.double(), V.double()
        tol = max(linalg.ORTHONORMALITY_TOL, 10 * torch.finfo(U.dtype).eps)
        if linalg.orthonormality_error(U64) > tol:
            U64, R = linalg.orthonormalize(U64)
            S64 = R @ S64
        if linalg.orthonormality_error(V64) > tol:
            V64, R = linalg.orthonormalize(V64)
            S64 = S64 @ R.mT
        u, s, v = linalg.svd(S64)
        r = S.shape[0]
        k = linalg.select_rank(s, cutoff=config.cutoff, max_rank=r, min_rank=config.min_rank,
                               current_rank=r, max_drop_fraction=config.max_drop_fraction)
        return U64 @ u[:, :k], torch.diag(s[:k]), V64 @ v[:, :k], u, v


def _resize(optimizer: torch.optim.Optimizer, layer: LowRankLayer, rank: int) -> bool:
    """Give ``layer`` rank ``rank`` (placeholder values, fresh optimizer state) before values are loaded; True if
    it got new Parameters."""
    if layer.rank == rank:
        return False
    old_S = layer.lowrank_S
    (m, n), ref = layer.matrix_shape, old_S
    layer.set_factors(ref.new_zeros(m, rank), ref.new_zeros(rank, rank), ref.new_zeros(n, rank))
    optim_state.swap_param(optimizer, old_S, layer.lowrank_S)
    return True


def _dense_weight(model: nn.Module, name: str) -> Tensor:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention):
        return parent.out_proj.weight if child == "out_proj" else getattr(parent, f"{child}_weight")
    return model.get_submodule(name).weight


def _trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
