"""Basis stability and spectrum metrics of weight matrices: pure functions of tensors (and of a tracker record)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import linalg

__all__ = ["basis_stability", "polar_alignment", "network_stability", "spectrum_stats"]


def basis_stability(w_prev: Tensor, w_now: Tensor) -> float:
    """How far the orthogonal basis of a weight moved between two snapshots, in ``[-1, 1]``.

    Each weight (any shape with at least 2 dimensions) is viewed as a matrix ``out × rest`` oriented tall,
    ``W (m×n)``, ``m >= n``; with ``Q = U_r V_rᵀ`` its polar factor (:func:`oialr.linalg.polar_factor`)::

        stability = tr(Q₁ᵀ Q₂) / n = mean over columns i of  cos(Q₁[:, i], Q₂[:, i])

    1: the basis did not move (rescaling singular values keeps it at 1); -1: ``W₂ = -W₁``; ~0: unrelated bases.
    Rank-deficient weights: directions with ``s_i <= 1e-6 · s_1`` count as zero, ``Q = U_r V_rᵀ``, and the trace is
    divided by the larger of the two ranks instead of ``n`` (``‖Q‖²_F = r``), so a factored layer whose rank-``r``
    basis did not move scores 1, and one whose rank fell from ``n`` to ``r`` scores about ``r / n``. A zero matrix
    scores 0. Non-finite weights give ``nan``.
    """
    for label, w in (("w_prev", w_prev), ("w_now", w_now)):
        if not isinstance(w, Tensor) or w.dim() < 2:
            found = f"{w.dim()}-D tensor" if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"basis_stability needs weights with at least 2 dimensions (a matrix, conv kernel, ...);"
                             f" {label} is a {found}")
    if w_prev.shape != w_now.shape:
        raise ValueError(f"basis_stability needs two snapshots of the same weight, got shapes {tuple(w_prev.shape)} "
                         f"(w_prev) and {tuple(w_now.shape)} (w_now)")
    if not (torch.isfinite(w_prev).all() and torch.isfinite(w_now).all()):
        return math.nan
    pair = torch.stack([linalg.tall_view(w.detach().double()) for w in (w_prev, w_now.to(w_prev.device))])
    q, _ = linalg.polar_factor(pair)                                       # (2, m, n)
    return polar_alignment(q[0], q[1])


def polar_alignment(q_prev: Tensor, q_now: Tensor) -> float:
    """``tr(Q₁ᵀ Q₂) / max(r₁, r₂)`` for polar factors of rank ``r = ‖Q‖²_F`` (0 for two zero matrices), clamped to
    ``[-1, 1]`` against rounding."""
    rank = max(round(q_prev.square().sum().item()), round(q_now.square().sum().item()))
    if rank == 0:
        return 0.0
    return min(max((q_prev * q_now).sum().item() / rank, -1.0), 1.0)


def network_stability(layers: dict[str, dict[str, Any]], names: list[str], *, weighted: bool = False) -> float | None:
    """Mean stability of the layers ``names`` of a tracker record's ``layers`` that have one (weighted by ``m·n``
    with ``weighted``); None when none has."""
    done = [(layers[n]["stability"], math.prod(layers[n]["shape"]) if weighted else 1) for n in names]
    done = [(s, w) for s, w in done if s is not None]
    return sum(s * w for s, w in done) / sum(w for _, w in done) if done else None


def spectrum_stats(s: Tensor, cutoff: float) -> tuple[Tensor, Tensor, Tensor]:
    """``σ_max``, effective rank and rank at ``cutoff`` of singular values ``s (..., k)`` sorted descending.

    effective rank (Roy & Vetterli 2007) ``= exp(-Σ p_i log p_i)``, ``p = s / Σ s`` (0 for a zero matrix);
    rank at cutoff ``= #{i : s_i >= cutoff · s_1}`` (0 for a zero matrix).
    """
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.where(p > 0, p * p.clamp_min(torch.finfo(s.dtype).tiny).log(), 0.0).sum(-1)
    erank = torch.where(total[..., 0] > 0, entropy.exp(), 0.0)
    rank = ((s >= cutoff * s[..., :1]) & (s[..., :1] > 0)).sum(-1)
    return s[..., 0], erank, rank
