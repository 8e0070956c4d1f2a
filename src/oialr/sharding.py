"""OIALR on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): every layer OIALR converts is its own
FSDP unit, gathered whole only while the controller changes it, and sharded again afterwards.

Layout (:func:`shard_targets`): ``shard(layer)`` for every target layer, then ``shard(model)`` for the root, which
holds every other Parameter (embeddings, norms, the layers kept dense, tied weights). FSDP2 stores each Parameter
as a ``DTensor`` sharded by rows (dim 0) over the processes: a dense ``W (m×n)`` before the transition, ``U (m×r)``,
``Σ (r×r)``, ``V (n×r)`` and the bias after it, each process holding about ``1/world`` of the rows.

When the controller changes a layer (:meth:`ShardedLayers.gathered`):

1. its Parameters are all-gathered (``DTensor.full_tensor``) into plain full Parameters, which take the sharded
   ones' places in the module and in the optimizer, with their optimizer state gathered likewise: the layer is
   then exactly what a single process holds, and the controller's single-process code (process 0's SVD,
   broadcast, :mod:`oialr.optim_state`) runs unchanged, one layer at a time;
2. afterwards, if the layer kept its Parameter objects (a basis update at unchanged rank), each process copies its
   rows of the new values, and of their optimizer state, into the sharded Parameters it had: nothing else changes;
3. if it got new Parameters (the transition builds a new layer; a rank change gives ``U``, ``Σ``, ``V`` new
   shapes), the new layer becomes a new FSDP unit (``shard(layer)``; a rank change first moves the factors into a
   fresh layer, :meth:`oialr.LowRankLayer.with_factors`, since a unit keeps the Parameters it was built with), its
   optimizer entries become its new sharded Parameters with their state cut into the same rows, and the root is
   told to take the new unit in at the next forward (:func:`_refresh_root`). Only the changed layer is re-sharded.

The values each process keeps are rows of tensors that every process computed from the same broadcast numbers, so
the shards are the corresponding rows of a single-process run (the tests check it).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import OIALRConfig, config_or_default
from .convert import replace_module
from .optim_state import find_group, swap_param
from .targets import _submodule_or_none, find_layers

Shard = Callable[[nn.Module], nn.Module]


def shard_targets(model: nn.Module, config: OIALRConfig | None = None, shard: Shard = fully_shard) -> nn.Module:
    """Shard ``model`` in the layout :class:`oialr.OIALR` needs with ``shard=``: ``shard(layer)`` for every layer
    ``config`` converts, then ``shard(model)``; returns ``model`` (sharded in place). Call it after
    ``init_process_group`` and before building the optimizer (FSDP2 replaces the Parameters). ``shard``: e.g.
    ``functools.partial(fully_shard, mesh=mesh, mp_policy=...)``; pass the same to the controller."""
    config = config_or_default(config)
    for name in target_modules(model, [info.name for info in find_layers(model, config) if info.convert]):
        shard(model.get_submodule(name))
    shard(model)
    return model


def target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """``targets``, each checked to be a module of its own (FSDP2 shards modules, not single Parameters)."""
    for name in targets:
        if not isinstance(_submodule_or_none(model, name), nn.Module):
            raise ValueError(f"layer {name!r} is a projection held by its attention module, which FSDP2 cannot "
                             "shard on its own; list it in OIALRConfig(exclude_modules=...) or train with DDP")
    return targets


def _is_unit(module: nn.Module) -> bool:
    """``module`` is an FSDP2 unit whose own Parameters it shards."""
    own = list(module.parameters(recurse=False))
    return isinstance(module, FSDPModule) and bool(own) and all(isinstance(p, DTensor) for p in own)


class ShardedLayers:
    """The FSDP2 units of the layers ``targets`` of the root ``model``, and the one way the controller changes them:
    :meth:`gathered`. ``shard`` builds a new unit (the callable :func:`shard_targets` was given)."""

    def __init__(self, model: nn.Module, targets: list[str], shard: Shard):
        if not callable(shard):
            raise TypeError(f"shard must be a callable module -> sharded module (e.g. torch.distributed.fsdp."
                            f"fully_shard), got {type(shard).__name__}")
        target_modules(model, targets)
        loose = [name for name in targets if not _is_unit(model.get_submodule(name))]
        if not isinstance(model, FSDPModule) or loose:
            what = "the model is not an FSDP2 root" if not isinstance(model, FSDPModule) else \
                f"layers {loose} are not FSDP2 units of their own"
            raise ValueError(f"OIALR with shard= needs every layer it converts sharded as its own unit and the model "
                             f"as the root, but {what}; call oialr.sharding.shard_targets(model, config, shard) "
                             "before building the optimizer")
        self.model, self.shard = model, shard
        self._replaced = False

    @staticmethod
    def whole(t: Tensor) -> Tensor:
        """``t``'s full value: a sharded tensor (``DTensor``) all-gathered, any other as it is. A collective: every
        process calls it, for the same tensors in the same order."""
        return t.full_tensor() if isinstance(t, DTensor) else t

    @contextmanager
    def gathered(self, name: str, optimizer: torch.optim.Optimizer) -> Iterator[nn.Module]:
        """The layer ``name`` with full, plain Parameters (and full optimizer state) inside the block; sharded again
        at its end as the module docstring says (not after an exception: the model is then unusable)."""
        unit = self.model.get_submodule(name)
        sharded = dict(unit.named_parameters(recurse=False))
        full = {attr: nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad) for attr, p in sharded.items()}
        for attr in sharded:
            setattr(unit, attr, full[attr])
            _move(optimizer, sharded[attr], full[attr], self.whole)
        yield unit
        with torch.no_grad():
            self._reshard(name, unit, sharded, full, optimizer)

    def _reshard(self, name: str, unit: nn.Module, sharded: dict[str, nn.Parameter], full: dict[str, nn.Parameter],
                 optimizer: torch.optim.Optimizer) -> None:
        now = self.model.get_submodule(name)
        if now is unit and all(getattr(unit, attr) is p for attr, p in full.items()):
            for attr, p in sharded.items():             # same Parameters: copy this process's rows back
                p.copy_(_rows_like(full[attr], p))
                setattr(unit, attr, p)
                _move(optimizer, full[attr], p, lambda t, p=p: _rows_like(t, p))
            return
        if now is unit:                                 # a rank change: the same Parameters in a fresh layer
            now = unit.with_factors(unit.lowrank_U, unit.lowrank_S, unit.lowrank_V)
            replace_module(self.model, name, now)
        for attr, p in sharded.items():                 # the old unit keeps no full tensor until it is freed
            setattr(unit, attr, p)
        plain = dict(now.named_parameters(recurse=False))
        self.shard(now)
        for attr, p in now.named_parameters(recurse=False):
            _move(optimizer, plain[attr], p, lambda t, p=p: _rows_like(t, p))
        _refresh_root(self.model)
        self._replaced = True

    def free_replaced(self) -> None:
        """Free the units replaced since the last call, with their shards: FSDP2 ties a unit to its state and hooks
        in reference cycles, which only the cyclic garbage collector frees, possibly much later (one
        ``gc.collect()``; call it after the transition or an update, not after every layer). A unit that the last
        step's autograd graph still reaches (the caller holds ``loss``) survives it, until the next collection."""
        if self._replaced:
            self._replaced = False
            gc.collect()


def _rows_like(t: Tensor, param: DTensor) -> Tensor:
    """The full tensor ``t`` shaped like ``param``, sharded as ``param`` is (this process's rows; every process holds
    the same ``t``, so no communication); any other tensor (Adam's ``step``) as it is."""
    if t.shape != param.shape or t.dim() == 0:
        return t
    return distribute_tensor(t, param.device_mesh, param.placements, src_data_rank=None)


def _move(optimizer: torch.optim.Optimizer, old: Tensor, new: nn.Parameter, convert: Callable[[Tensor], Tensor]):
    """Put ``new`` where ``old`` is in the optimizer (if it is), with ``old``'s state mapped by ``convert``."""
    if find_group(optimizer, old) is None:
        return
    state = swap_param(optimizer, old, new)
    if state:
        optimizer.state[new] = {k: convert(v) if isinstance(v, Tensor) else v for k, v in state.items()}


def _refresh_root(root: nn.Module) -> None:
    """Make the FSDP2 root find its units again at the next forward, as at its first one.

    The root's lazy initialisation (``FSDPState._lazy_init``, torch 2.14) records every unit below it in its state
    context (``_state_ctx.all_states``: the units whose gradients the end of the backward pass finalises) and marks
    each unit non-root (``_is_root``). A unit built later is missing from that list and would act as a root of its
    own (no resharding after its forward, its own end-of-backward callback), while the replaced unit stayed in the
    list, its Parameters kept alive. Clearing both (the only torch internals oialr touches) makes the next forward
    run the lazy initialisation again, which is what FSDP2 does for a model sharded from scratch; tested in
    ``tests/test_fsdp.py``."""
    state = root._get_fsdp_state()
    for unit_state in state._state_ctx.all_states:
        unit_state._is_root = None
    state._state_ctx.all_states.clear()
