"""The maths of OIALR's factorisations, as pure functions: the transition's truncated SVD and the basis update."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import linalg
from .config import OIALRConfig


class Factors(NamedTuple):
    """``W (m×n) ≈ U Σ Vᵀ`` with ``U (m×r)``, ``Σ (r×r)``, ``V (n×r)``."""

    U: Tensor
    S: Tensor
    V: Tensor


class BasisUpdate(NamedTuple):
    """One layer's basis update: the new factors ``U (m×k)``, ``Σ (k×k)``, ``V (n×k)`` and the rotations
    ``u``, ``v`` (``r×r``, the old rank) that carry ``Σ``'s optimizer state (:func:`oialr.optim_state.rotate`)."""

    U: Tensor
    S: Tensor
    V: Tensor
    u: Tensor
    v: Tensor

    @property
    def factors(self) -> Factors:
        return Factors(self.U, self.S, self.V)


def stored_params(m: int, n: int, r: int) -> int:
    """Parameters a rank-``r`` factorisation ``U Σ Vᵀ`` of an ``m×n`` weight stores: ``r·(m + n + r)``."""
    return r * (m + n + r)


def placeholder_factors(m: int, n: int, rank: int, like: Tensor) -> Factors:
    """Zero factors ``U (m×r)``, ``Σ (r×r)``, ``V (n×r)`` in ``like``'s dtype and device: the shapes of a saved run,
    whose values are loaded next (no SVD)."""
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a ({m}, {n}) weight, got {rank}")
    return Factors(like.new_zeros(m, rank), like.new_zeros(rank, rank), like.new_zeros(n, rank))


def transition_factors(matrix: Tensor, config: OIALRConfig, rank: int | None = None) -> Factors:
    """The transition of one weight ``W (m×n)``: thin SVD ``W = U diag(s) Vᵀ`` (float32 or better,
    :func:`oialr.linalg.svd`), keeping ``r`` values: ``rank`` if given (a restored run), else
    :func:`oialr.linalg.select_rank` (``s_i >= cutoff · s_1``, at most ``ceil(rank_fraction · min(m, n))``).
    Returns ``U[:, :r]``, ``Σ = diag(s[:r])``, ``V[:, :r]`` in ``W``'s dtype."""
    u, s, v = linalg.svd(matrix)
    if rank is None:
        rank = linalg.select_rank(s, cutoff=config.cutoff, max_rank=math.ceil(config.rank_fraction * s.numel()),
                                  min_rank=config.min_rank)
    if not 1 <= rank <= s.numel():
        raise ValueError(f"rank must be in [1, {s.numel()}] for a {tuple(matrix.shape)} weight, got {rank}")
    return Factors(*(t.to(matrix.dtype).contiguous() for t in (u[:, :rank], torch.diag(s[:rank]), v[:, :rank])))


def basis_update(U: Tensor, S: Tensor, V: Tensor, config: OIALRConfig) -> BasisUpdate:
    """One basis update of ``W = U Σ Vᵀ`` (computed in float64, outside autocast).

    Re-orthonormalize a drifted basis (``U = Q R`` -> ``U ← Q``, ``Σ ← R Σ``; likewise ``V``, ``Σ ← Σ Rᵀ``), then
    ``Σ = u diag(s) vᵀ`` and keep ``k`` values (:func:`oialr.linalg.select_rank` with the current rank as the
    reference): returns ``U u[:, :k]``, ``diag(s[:k])``, ``V v[:, :k]`` and the full ``u``, ``v`` (``r×r``). The
    product ``U Σ Vᵀ`` is unchanged but for the dropped values.
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
        return BasisUpdate(U64 @ u[:, :k], torch.diag(s[:k]), V64 @ v[:, :k], u, v)
