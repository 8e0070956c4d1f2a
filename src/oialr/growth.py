"""Rank growth: widen a layer's bases ``U``, ``V`` with the directions of the loss gradient that they miss.

For ``W = U Σ Vᵀ (m×n)``, ``U (m×k)``, ``V (n×k)`` orthonormal, and the loss gradient ``G = ∂L/∂W (m×n)``, the
gradients the factored forward gives the bases are ``∂L/∂U = G V Σᵀ (m×k)`` and ``∂L/∂V = Gᵀ U Σ (n×k)``: the
spans of ``G V`` and ``Gᵀ U`` (for invertible ``Σ``), computed by the layer's own backward pass without the dense
``G`` (``dYᵀ (X V)`` and ``Xᵀ (dY U)`` on the chain path). :class:`GradientRecorder` sums them over one step's
backward passes, for the bases before the basis update; :func:`carry_gradients` turns them into those of the cut
bases (exactly, for the same ``G``); :func:`widen` turns these into new directions::

    P_U = (I − U Uᵀ) ∂L/∂U,   P_V = (I − V Vᵀ) ∂L/∂V            (what the bases miss; m×k, n×k)
    Q_U (m×p), Q_V (n×p)    the leading left singular vectors of P_U, P_V (values above rtol · ‖∂L/∂·‖_F),
                             from a thin QR ``P = Q R`` and the SVD of the small ``R = a diag(s) bᵀ``: ``Q a``,
                             or ``Q`` itself when all ``k`` directions are kept (only ``s`` is needed then)
    U' = [U, Q_U],  V' = [V, Q_V],  Σ' = [[Σ, 0], [0, 0]]       ((k+p)×(k+p); U' Σ' V'ᵀ = U Σ Vᵀ)

with ``p <= min(k, min(m, n) − k)`` (at most doubling the rank, as the rank-adaptive integrator of DLRT augments
``r`` to ``2r``). The new block of ``Σ'`` is zero, but its gradient ``U'ᵀ G V'`` is not: the next steps train it,
and the next basis update's cut keeps the new directions that earned singular values.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from . import distributed, linalg
from .factorize import BasisUpdate, Factors
from .layers import LowRankLayer

# directions of the projected gradient below this fraction of the gradient's norm count as absent
GRADIENT_RTOL = 1e-6


def new_directions(basis: Tensor, grad: Tensor, count: int, rtol: float = GRADIENT_RTOL) -> Tensor:
    """At most ``count`` orthonormal columns ``Q (m×p)``, orthogonal to ``basis (m×k)`` (orthonormal), spanning the
    strongest part of ``(I − B Bᵀ) grad`` (``grad (m×q)``); float64."""
    B, g = basis.detach().double(), grad.detach().double()
    scale = torch.linalg.matrix_norm(g).item()
    if count <= 0 or scale == 0.0 or not torch.isfinite(g).all():
        return B.new_zeros(B.shape[0], 0)
    P = g - B @ (B.mT @ g)
    P = P - B @ (B.mT @ P)                                       # twice is enough (Kahan–Parlett)
    Q, R = torch.linalg.qr(P)                                    # P = Q R, then R = a diag(s) bᵀ (q×q):
    p = min(count, int((torch.linalg.svdvals(R) > rtol * scale).sum()))
    if p == Q.shape[1]:                                          # every direction kept: Q spans them all
        return Q
    return Q @ linalg.svd(R)[0][:, :p]                           # P's left singular vectors are Q a


def widen(factors: Factors, grad_U: Tensor, grad_V: Tensor, rtol: float = GRADIENT_RTOL) -> Factors:
    """``U' = [U, Q_U]``, ``Σ' = [[Σ, 0], [0, 0]]``, ``V' = [V, Q_V]`` (module docstring) in the factors' dtype;
    ``grad_U (m×q)``, ``grad_V (n×q)`` are ``∂L/∂U``, ``∂L/∂V`` of any basis of the same layer (only their spans
    are used). Returns ``factors`` unchanged when the gradient adds no direction."""
    U, S, V = factors
    k = S.shape[0]
    count = min(k, min(U.shape[0], V.shape[0]) - k)
    Q_U, Q_V = new_directions(U, grad_U, count, rtol), new_directions(V, grad_V, count, rtol)
    p = min(Q_U.shape[1], Q_V.shape[1])
    if p == 0:
        return factors
    if Q_U.shape[1] > p:                                         # the strongest p of the side that has more
        Q_U = new_directions(U, grad_U, p, rtol)
    if Q_V.shape[1] > p:
        Q_V = new_directions(V, grad_V, p, rtol)
    S_wide = S.new_zeros(k + p, k + p)
    S_wide[:k, :k] = S
    return Factors(torch.cat([U, Q_U.to(U)], dim=1), S_wide, torch.cat([V, Q_V.to(V)], dim=1))


def carry_gradients(grads: tuple[Tensor, Tensor], update: BasisUpdate) -> tuple[Tensor, Tensor]:
    """``∂L/∂U (m×r)``, ``∂L/∂V (n×r)`` recorded for the bases before a basis update, for the bases ``U' (m×k)``,
    ``V' (n×k)`` after it, with the same ``G``: ``∂L/∂U' = G V' Σ'ᵀ = ∂L/∂U · T_U`` and ``∂L/∂V' = ∂L/∂V · T_V``
    (:meth:`oialr.factorize.BasisUpdate.basis_maps`, which needs ``R_U``, ``R_V``), float64."""
    T_U, T_V = update.basis_maps()
    return grads[0].double() @ T_U, grads[1].double() @ T_V


def widen_all(layers: dict[str, LowRankLayer], grads: dict[str, tuple[Tensor, Tensor]]) -> list[Factors]:
    """:func:`widen` for every layer, with its recorded ``∂L/∂U``, ``∂L/∂V`` (of its current bases, float64,
    :func:`carry_gradients`; zeros where none was recorded: nothing is added), summed over the processes onto
    process 0, which computes the new factors; every process gets process 0's
    (:func:`oialr.distributed.broadcast_factors`)."""
    out = []
    for name, layer in layers.items():
        U, S, V = layer.lowrank_U.detach(), layer.lowrank_S.detach(), layer.lowrank_V.detach()
        recorded = list(grads[name]) if name in grads else [
            torch.zeros(B.shape, dtype=torch.float64, device=B.device) for B in (U, V)]
        distributed.sum_to_source_(recorded)
        wide = widen(Factors(U, S, V), *recorded) if distributed.is_source() else None
        out.append(distributed.broadcast_factors(wide, layer.matrix_shape, like=S))
    return out


class GradientRecorder:
    """Sums ``∂L/∂U`` and ``∂L/∂V`` of factored layers over the backward passes between :meth:`start` and
    :meth:`stop`: frozen bases get ``requires_grad`` for that time (the backward then also computes their
    gradients, ``tokens·k·(m + n)`` multiply-adds per layer) and a hook on each basis adds its gradient to a
    buffer. Trained bases keep their own ``.grad`` for the optimizer; the buffer is separate."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Tensor | None]] = {}
        self._handles: list = []
        self._frozen: list[Tensor] = []

    @property
    def recording(self) -> bool:
        return bool(self._handles)

    def start(self, layers: dict[str, LowRankLayer]) -> None:
        """Record the gradients of every layer's ``U`` and ``V`` from now on (restarting any recording)."""
        self.stop()
        for name, layer in layers.items():
            self.sums[name] = [None, None]
            for i, basis in enumerate((layer.lowrank_U, layer.lowrank_V)):
                if not basis.requires_grad:
                    basis.requires_grad_(True)
                    self._frozen.append(basis)
                self._handles.append(basis.register_hook(self._adder(name, i)))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Inside the block the bases the recording unfroze are frozen again (e.g. while DDP is built, so that it
        neither syncs them nor waits for their gradients later)."""
        for basis in self._frozen:
            basis.requires_grad_(False)
        try:
            yield
        finally:
            for basis in self._frozen:
                basis.requires_grad_(True)

    def _adder(self, name: str, i: int):
        def add(grad: Tensor) -> None:
            sums = self.sums[name]
            sums[i] = grad.detach().clone() if sums[i] is None else sums[i] + grad.detach()
        return add

    def stop(self) -> dict[str, tuple[Tensor, Tensor]]:
        """End the recording; return ``{name: (∂L/∂U, ∂L/∂V)}`` for the layers that got gradients. Frozen bases
        are frozen again, without a ``.grad``."""
        for handle in self._handles:
            handle.remove()
        for basis in self._frozen:
            basis.requires_grad_(False)
            basis.grad = None
        sums = {name: (g[0], g[1]) for name, g in self.sums.items() if g[0] is not None and g[1] is not None}
        self.sums, self._handles, self._frozen = {}, [], []
        return sums
