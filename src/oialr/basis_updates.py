"""The basis update of all factored layers (ranks by the cutoff or a size budget, process 0's SVDs broadcast, then
growth), the one place a factored layer and the optimizer take new factors, and a budget's ranks at the transition."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from . import budget, distributed, growth, linalg, optim_state
from .config import OIALRConfig
from .factorize import BasisUpdate, Factors, cut_rank, placeholder_factors, rotation, truncate
from .layers import LowRankLayer
from .output_sample import output_values
from .targets import as_matrix, layer_weight


def update_all(layers: dict[str, LowRankLayer], optimizer, config: OIALRConfig,
               grads: dict[str, tuple[Tensor, Tensor]] | None,
               outputs: dict[str, Tensor] | None = None) -> tuple[bool, dict[str, int]]:
    """Basis update of every layer in ``layers`` (:func:`oialr.factorize.rotation`, then :func:`~oialr.factorize.
    truncate` to :func:`~oialr.factorize.cut_rank`, or, with ``config.stored_budget`` and ``augment_bases``, to
    :func:`oialr.budget.update_ranks` over all ``layers``, each component weighed by its output scale on the
    recorded ``outputs`` rows of every process (:func:`oialr.output_sample.output_values`): without growth the
    ranks never exceed the transition's allocation, and the budget's allocation is then every layer's cut, so the
    layers are independent), computed by process 0 and broadcast, applied on every process (:func:`apply_factors`);
    then, with ``grads`` (``augment_bases``: the recorded ``∂L/∂U``, ``∂L/∂V``, carried to the cut bases by
    :func:`oialr.growth.carry_gradients`), every layer widened (:func:`oialr.growth.widen_all`). The caller has
    checked the factors (:func:`oialr.health.check_layers`). Returns whether Parameter objects were replaced and
    the ranks the cut kept (before growth)."""
    updates = None
    allocate = config.stored_budget is not None and config.augment_bases
    rows = {name: distributed.gather_rows((outputs or {}).get(name), layer.matrix_shape[0])
            for name, layer in layers.items()} if allocate else {}
    if distributed.is_source():
        rotations = [rotation(layer.lowrank_U, layer.lowrank_S, layer.lowrank_V) for layer in layers.values()]
        if allocate:
            values = [output_values(rot.s, rot.Q_U @ rot.u, rows[name]) for name, rot in zip(layers, rotations)]
            keep = budget.update_ranks([rot.s for rot in rotations], [layer.matrix_shape for layer in layers.values()],
                                       config, values)
        else:                                       # without growth a budget's allocation is each layer's cut
            keep = [cut_rank(rot.s, config) for rot in rotations]
        updates = [truncate(rot, k) for rot, k in zip(rotations, keep)]
    shapes = [(*layer.matrix_shape, layer.rank) for layer in layers.values()]
    like = next(iter(layers.values())).lowrank_S
    replaced = False
    updates = distributed.broadcast_updates(updates, shapes, like, config.train_bases or grads is not None)
    for layer, update in zip(layers.values(), updates):
        if update is not None:
            replaced |= apply_factors(layer, optimizer, update, config.train_bases)
    cut = {name: layer.rank for name, layer in layers.items()}
    if grads is not None:
        grads = {name: growth.carry_gradients(grads[name], update)
                 for name, update in zip(layers, updates) if name in grads}
        for layer, wide in zip(layers.values(), growth.widen_all(layers, grads)):
            if wide.S.shape[0] != layer.rank:
                replaced |= apply_factors(layer, optimizer, wide, config.train_bases, widened=True)
    return replaced, cut


def apply_factors(layer: LowRankLayer, optimizer, new: BasisUpdate | Factors, train_bases: bool,
                  widened: bool = False) -> bool:
    """The one place factors change after the transition: the layer takes the new ``U``, ``Σ``, ``V`` (new
    Parameters when the rank changes) and the optimizer entries of the trained ones (``Σ``; ``U``, ``V`` with
    ``train_bases``) follow: rotated by a basis update (:func:`oialr.optim_state.rotate`, ``carry_basis``; with
    trained bases ``Σ``'s state also follows the re-orthonormalisation: ``R_U Σ R_Vᵀ = u diag(s) vᵀ`` gives
    ``∂L/∂Σ' = (R_U⁻¹ u)ᵀ (∂L/∂Σ) (R_V⁻¹ v)``),
    zero-padded when ``widened`` (:func:`oialr.optim_state.pad`), or fresh for other ``Factors`` (a restore, whose
    state is loaded next). Returns whether Parameter objects were replaced (a wrapper holding them is stale)."""
    old = (layer.lowrank_U, layer.lowrank_S, layer.lowrank_V)
    replaced = layer.set_factors(new.U, new.S, new.V)
    now = (layer.lowrank_U, layer.lowrank_S, layer.lowrank_V)
    if isinstance(new, BasisUpdate):
        u, v = new.u, new.v
        if train_bases:             # Σ's coordinates moved by R too: ∂L/∂Σ' = (R_U⁻¹u)ᵀ ∂L/∂Σ (R_V⁻¹v)
            u = torch.linalg.solve_triangular(new.R_U, u, upper=True)
            v = torch.linalg.solve_triangular(new.R_V, v, upper=True)
        optim_state.rotate(optimizer, old[1], now[1], u, v)
        if train_bases:
            for i, T in zip((0, 2), new.basis_maps()):
                optim_state.carry_basis(optimizer, old[i], now[i], T)
        return replaced
    for i in (0, 1, 2) if train_bases else (1,):
        if widened:
            optim_state.pad(optimizer, old[i], now[i])
        elif now[i] is not old[i]:
            optim_state.swap_param(optimizer, old[i], now[i])
    return replaced


def restore_ranks(layers: dict[str, LowRankLayer], optimizer, ranks: dict[str, int], train_bases: bool) -> bool:
    """Give every layer whose rank differs from the saved ``ranks`` placeholder factors of that rank
    (:func:`oialr.factorize.placeholder_factors`: a restore, whose values and optimizer state are loaded next).
    Returns whether Parameter objects were replaced."""
    replaced = False
    for name, layer in layers.items():
        if layer.rank != ranks[name]:
            new = placeholder_factors(*layer.matrix_shape, ranks[name], like=layer.lowrank_S)
            replaced |= apply_factors(layer, optimizer, new, train_bases)
    return replaced


def transition_ranks(model: nn.Module, targets: list[str], config: OIALRConfig, whole: Callable[[Tensor], Tensor],
                     outputs: dict[str, Tensor] | None = None) -> dict[str, int] | None:
    """The ranks ``config.stored_budget`` gives the layers ``targets`` at the transition
    (:func:`oialr.budget.transition_ranks`), allocated on process 0 from every weight's singular values and their
    output scales on the recorded ``outputs`` rows of every process (:mod:`oialr.output_sample`, gathered on
    process 0; the singular values alone for a layer without rows), and broadcast; ``None`` without a budget. One
    weight at a time: ``whole`` gives its full value (under FSDP2 an all-gather, which every process calls),
    process 0 takes its SVD, and it is dropped before the next."""
    if config.stored_budget is None:
        return None
    spectra, values, shapes = [], [], []
    for name in targets:
        module, weight = layer_weight(model, name)
        matrix = as_matrix(module, whole(weight))
        shapes.append(tuple(matrix.shape))
        rows = distributed.gather_rows((outputs or {}).get(name), matrix.shape[0])
        if distributed.is_source():
            if rows is None:
                spectra.append(budget.spectrum(matrix))
                values.append(spectra[-1])
            else:
                U, s, _ = linalg.svd(matrix)
                spectra.append(s)
                values.append(output_values(s, U, rows))
                del U
        del module, weight, matrix
    ranks = budget.transition_ranks(spectra, shapes, config, values) if distributed.is_source() \
        else [0] * len(targets)
    return dict(zip(targets, distributed.broadcast_ints(ranks)))
