"""Move ``Σ`` into and out of an optimizer's param groups; carry its state across basis changes.

Known optimizers: ``torch.optim.Adam``/``AdamW`` (amsgrad included) and ``torch.optim.SGD``. Any other optimizer gets
fresh state for ``Σ`` at the transition and at every basis update (the caller warns once).

Transition (dense ``W`` -> ``U Σ Vᵀ``), per layer:
    the weight leaves its param group and ``Σ`` takes its place (same group, same position, so the optimizer's
    ``state_dict`` order is reproducible). Adam: ``Σ`` starts with no state, i.e. ``step = 0`` and zero moments, so
    bias correction is exact (keeping the old step count with zeroed moments, as the published code did, makes the
    first updates ~3x too large). SGD: the momentum buffer is projected exactly, ``b_Σ = Uᵀ b_W V``.

Basis update (``Σ = u diag(s) vᵀ``; new coordinates ``Σ' = uᵀ Σ v``, gradients ``g' = uᵀ g v``), keeping ``k`` values:
    first moment / momentum (linear in ``g``), exact:   ``m' = (uᵀ m v)[:k, :k]``
    Adam second moment ``a = E[g²]`` (elementwise; ``exp_avg_sq``) cannot be rotated exactly (that needs the
    covariances of the entries); treating the entries of ``g`` as uncorrelated gives
    ``E[g'²_ij] = Σ_kl u²_ki v²_lj E[g²_kl]``, i.e.
        ``a' = (u∘u)ᵀ a (v∘v)``, then ``[:k, :k]``.
    ``u∘u`` and ``v∘v`` are doubly stochastic, so every new entry is a weighted mean of old ones and the total is
    kept; it is exact when ``u``, ``v`` are signed permutations. (An upper bound, Cauchy–Schwarz on each entry, is
    safe in theory but inflates ``a`` by up to ``r²`` when ``Σ``'s singular values are close and its SVD mixes
    many of them, as right after the transition: on the Fashion-MNIST mini-ViT the first update grew ``a`` ~100×
    and Adam's steps on ``Σ`` shrank ~10×, stalling training.) ``step`` is kept.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from . import linalg
from ._checks import warn


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str | None:
    """``"adam"``, ``"sgd"`` or ``None`` for an optimizer whose state this module does not know how to carry."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return None


_WARNED: weakref.WeakSet = weakref.WeakSet()       # optimizers already warned about by warn_if_unknown


def warn_if_unknown(optimizer: torch.optim.Optimizer) -> None:
    """Warn, once per optimizer, when this module cannot carry its state across basis changes."""
    if optimizer_kind(optimizer) is None and optimizer not in _WARNED:
        _WARNED.add(optimizer)
        warn(f"OIALR does not know how to carry {type(optimizer).__name__} state across basis changes; Σ gets fresh "
             "optimizer state at the transition and at every basis update (known: Adam, AdamW, SGD)")


def find_group(optimizer: torch.optim.Optimizer, param: Tensor) -> dict | None:
    """The param group holding ``param`` (compared by identity), or ``None``."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def swap_param(optimizer: torch.optim.Optimizer, old: Tensor, *new: nn.Parameter) -> dict:
    """Put ``new`` (one Parameter, or several in order) where ``old`` is in its param group (same position, so the
    optimizer's ``state_dict`` order is reproducible); drop ``old``'s state and return it."""
    group = find_group(optimizer, old)
    if group is None:
        raise ValueError(f"parameter of shape {tuple(old.shape)} is not in the optimizer; build the optimizer over "
                         "model.parameters()")
    params = group["params"]
    i = next(i for i, p in enumerate(params) if p is old)
    params[i:i + 1] = new
    return optimizer.state.pop(old, {})


@torch.no_grad()
def enter_lowrank(optimizer: torch.optim.Optimizer, weight: Tensor, S: nn.Parameter, U: Tensor, V: Tensor,
                  as_matrix: Callable[[Tensor], Tensor] = linalg.matrix_view) -> None:
    """Transition: ``S`` replaces ``weight`` in the optimizer, with the state described in the module docstring
    (SGD's momentum, shaped like ``weight`` and seen as the ``m×n`` matrix by ``as_matrix``, projected in
    float64); trained bases (``requires_grad``) follow ``S`` in the same param group (the hyperparameters of the
    weight they replace), with fresh state."""
    old_state = swap_param(optimizer, weight, S, *(p for p in (U, V) if p.requires_grad))
    if optimizer_kind(optimizer) == "sgd" and old_state.get("momentum_buffer") is not None:
        U, V = U.double(), V.double()
        buf = as_matrix(old_state["momentum_buffer"]).double()
        optimizer.state[S] = {"momentum_buffer": (U.mT @ buf @ V).to(S.dtype)}


@torch.no_grad()
def rotate(optimizer: torch.optim.Optimizer, old_S: Tensor, new_S: nn.Parameter, u: Tensor, v: Tensor) -> None:
    """Basis update: move ``old_S``'s state to ``new_S`` in the rotated coordinates, truncated to ``new_S``'s rank
    (unknown optimizers: ``new_S`` starts with fresh state).

    ``u``, ``v`` (``r×r``) are the singular vectors of the old ``Σ``; ``new_S`` is ``k×k`` with ``k <= r``.
    ``old_S`` and ``new_S`` may be the same Parameter object (rank unchanged, factors updated in place).
    """
    k = new_S.shape[0]
    u, v = u.to(torch.float64), v.to(torch.float64)
    _moments(optimizer, old_S, new_S, lambda m: (u.mT @ m.to(torch.float64) @ v)[:k, :k],
             lambda sq: ((u * u).mT @ sq.to(torch.float64) @ (v * v))[:k, :k])


def _moments(optimizer: torch.optim.Optimizer, old: Tensor, new: nn.Parameter, first, second) -> None:
    """Move ``old``'s state to ``new`` (swapping it into the param group unless it is ``old``), mapping the first
    moments / momentum with ``first`` and Adam's second moments with ``second``; ``step`` is kept."""
    state = swap_param(optimizer, old, new) if old is not new else optimizer.state.pop(new, {})
    kind = optimizer_kind(optimizer)
    if not state or kind is None:
        return
    new_state = dict(state)
    names = ("momentum_buffer",) if kind == "sgd" else ("exp_avg",)
    for name in names:
        if state.get(name) is not None:
            new_state[name] = first(state[name]).to(state[name].dtype).contiguous()
    for name in ("exp_avg_sq", "max_exp_avg_sq") if kind == "adam" else ():
        if name in state:
            new_state[name] = second(state[name]).to(state[name].dtype).contiguous()
    optimizer.state[new] = new_state


@torch.no_grad()
def carry_basis(optimizer: torch.optim.Optimizer, old: Tensor, new: nn.Parameter, T: Tensor) -> None:
    """A trained basis ``U (m×r)`` replaced by ``U' (m×k)`` with ``∂L/∂U' = (∂L/∂U) T`` (``T (r×k)``,
    :meth:`oialr.factorize.BasisUpdate.basis_maps`): first moment / momentum ``m' = m T`` (exact, linear in the
    gradient), Adam's second moment ``v' = v (T∘T)`` (entries treated as uncorrelated, as :func:`rotate` does);
    ``step`` kept."""
    T = T.to(torch.float64)
    _moments(optimizer, old, new, lambda m: m.to(torch.float64) @ T, lambda v: v.to(torch.float64) @ (T * T))


@torch.no_grad()
def pad(optimizer: torch.optim.Optimizer, old: Tensor, new: nn.Parameter) -> None:
    """A factor widened by new directions (``Σ (k×k)`` -> ``(k+p)×(k+p)``, ``U (m×k)`` -> ``m×(k+p)``, ``old``'s
    values in the leading block): its state moves to ``new`` with zeros for the new entries, Adam's ``step`` kept.
    With ``step`` already large, bias correction no longer scales a new entry's moments up, so after ``j`` steps its
    update is ``(1−β₁ʲ)/√(1−β₂ʲ)`` times a settled entry's with the same gradient: 3.2× at ``j = 1``, up to 6.6×
    near ``j ≈ 12`` at the default betas. (Giving the new entries the mean of the old second moments instead
    over-damps them: the toy regression of ``tests/test_growth.py`` then regains rank 7 of 8 and a loss of 0.36
    instead of 0.078 after 160 steps.)"""
    def widen(t: Tensor) -> Tensor:
        out = t.new_zeros(new.shape)
        out[tuple(slice(0, d) for d in t.shape)] = t
        return out

    _moments(optimizer, old, new, widen, widen)
