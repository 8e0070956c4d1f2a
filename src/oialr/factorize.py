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
    """One layer's basis update: the new factors ``U (m×k)``, ``Σ (k×k)``, ``V (n×k)``, the rotations ``u``, ``v``
    (``r×r``, the old rank) that carry ``Σ``'s optimizer state (:func:`oialr.optim_state.rotate`) and the factors
    ``R_U``, ``R_V`` (``r×r``) of the re-orthonormalisation ``U = Q_U R_U``, ``V = Q_V R_V`` (identity when the
    basis had not drifted), which with ``u``, ``v`` carry trained bases' state (:meth:`basis_maps`)."""

    U: Tensor
    S: Tensor
    V: Tensor
    u: Tensor
    v: Tensor
    R_U: Tensor
    R_V: Tensor

    def basis_maps(self) -> tuple[Tensor, Tensor]:
        """``T_U = R_Uᵀ u[:, :k]``, ``T_V = R_Vᵀ v[:, :k]`` (``r×k``): the new ``U' = Q_U u_k = U R_U⁻¹ u_k``, so a
        gradient ``g = ∂L/∂U`` becomes ``∂L/∂U' = g R_Uᵀ u_k = g T_U`` (likewise ``V``)."""
        k = self.S.shape[0]
        return self.R_U.mT @ self.u[:, :k], self.R_V.mT @ self.v[:, :k]

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


class Rotation(NamedTuple):
    """A basis update before the cut, all float64: ``U = Q_U R_U``, ``V = Q_V R_V`` (thin QR, only for a drifted
    basis: else ``Q = U``, ``R = I``) and ``R_U Σ R_Vᵀ = u diag(s) vᵀ``, so ``U Σ Vᵀ = (Q_U u) diag(s) (Q_V v)ᵀ`` and
    ``s`` are the layer's singular values."""

    Q_U: Tensor
    Q_V: Tensor
    u: Tensor
    s: Tensor
    v: Tensor
    R_U: Tensor
    R_V: Tensor


def rotation(U: Tensor, S: Tensor, V: Tensor) -> Rotation:
    """:class:`Rotation` of ``W = U Σ Vᵀ`` (computed in float64, outside autocast)."""
    with torch.autocast(device_type=S.device.type, enabled=False):
        U64, S64, V64 = U.detach().double(), S.detach().double(), V.detach().double()
        R_U = R_V = torch.eye(S.shape[0], dtype=torch.float64, device=S.device)
        tol = max(linalg.ORTHONORMALITY_TOL, 10 * torch.finfo(U.dtype).eps)
        if linalg.orthonormality_error(U64) > tol:
            U64, R_U = linalg.orthonormalize(U64)
            S64 = R_U @ S64
        if linalg.orthonormality_error(V64) > tol:
            V64, R_V = linalg.orthonormalize(V64)
            S64 = S64 @ R_V.mT
        u, s, v = linalg.svd(S64)
        return Rotation(U64, V64, u, s, v, R_U, R_V)


def truncate(rot: Rotation, rank: int) -> BasisUpdate:
    """The basis update keeping ``rank`` values: ``Q_U u[:, :k]``, ``diag(s[:k])``, ``Q_V v[:, :k]``, with the full
    ``u``, ``v`` and the ``R`` factors."""
    r = rot.s.numel()
    if not 1 <= rank <= r:
        raise ValueError(f"a basis update keeps between 1 and the current rank {r} values, got rank={rank}")
    k = rank
    return BasisUpdate(rot.Q_U @ rot.u[:, :k], torch.diag(rot.s[:k]), rot.Q_V @ rot.v[:, :k], rot.u, rot.v,
                       rot.R_U, rot.R_V)


def basis_update(U: Tensor, S: Tensor, V: Tensor, config: OIALRConfig, rank: int | None = None) -> BasisUpdate:
    """One basis update of ``W = U Σ Vᵀ``: :func:`rotation` (re-orthonormalize a drifted basis, ``U = Q R`` ->
    ``U ← Q``, ``Σ ← R Σ``; likewise ``V``, ``Σ ← Σ Rᵀ``; then ``Σ = u diag(s) vᵀ``) and :func:`truncate` to ``k``
    values: ``rank`` if given (e.g. by a size budget), else :func:`oialr.linalg.select_rank` with the current rank
    as the reference. The product ``U Σ Vᵀ`` is unchanged but for the dropped values.
    """
    rot = rotation(U, S, V)
    return truncate(rot, rank if rank is not None else cut_rank(rot.s, config))


def cut_rank(s: Tensor, config: OIALRConfig) -> int:
    """The rank a basis update of a rank-``r`` layer with singular values ``s (r)`` keeps by the cutoff rule:
    :func:`oialr.linalg.select_rank` with ``r`` as the current rank (``max_drop_fraction``, ``min_rank``)."""
    r = s.numel()
    return linalg.select_rank(s, cutoff=config.cutoff, max_rank=r, min_rank=config.min_rank, current_rank=r,
                              max_drop_fraction=config.max_drop_fraction)
