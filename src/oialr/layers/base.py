"""LowRankLayer: the shared base of the factored layers, ``W = U Σ Vᵀ`` with only ``Σ`` trainable."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .dynamic import dynamic_ranks

PATHS = ("chain", "merged", "dense")
_forced_path: str | None = None         # set by force_path()


def forward_path(tokens: int, m: int, n: int, r: int, bases_train: bool = False) -> str:
    """The cheapest way to apply ``W = U Σ Vᵀ`` (``m×n``, rank ``r``) to ``tokens`` rows, by multiply-adds of the
    forward and backward passes together (backward: the input gradient and ``Σ``'s gradient, and with ``bases_train``
    (``OIALRConfig(train_bases=True)``) ``U``'s and ``V``'s).

    ``"chain"``   ``h = x V``, ``h ← h Σᵀ``, ``y = h Uᵀ``: tokens·r·(2m + 2n + 3r), bases trained + tokens·r·(m + n).
                  With frozen bases it saves only ``h (tokens×r)`` for the backward pass (``x`` is not kept), so
                  activation memory falls with ``r`` too; ``V``'s gradient needs ``x``.
    ``"merged"``  ``h = x (Σ Vᵀ)ᵀ``, ``y = h Uᵀ``: tokens·r·(2m + 3n) + 2·n·r², bases trained + tokens·r·m + n·r².
                  Cheaper than the chain for ``r > n / 3``, and with trained bases for ``tokens > n``; keeps ``x``.
    ``"dense"``   rebuild ``W`` (:func:`rebuild`), ``y = x Wᵀ``: 3·tokens·m·n + 2·(m·r·n + min(m, n)·r²), bases
                  trained + 2·m·n·r + (m + n)·r²; the published code's way; cheapest when ``r·(m + n)`` approaches
                  ``m·n``.
    ``tokens`` is the number of rows the layer is applied to (batch × sequence, or batch × output positions).
    """
    trained = int(bases_train)
    costs = {
        "chain": tokens * r * (2 * m + 2 * n + 3 * r) + trained * tokens * r * (m + n),
        "merged": tokens * r * (2 * m + 3 * n) + 2 * n * r * r + trained * (tokens * r * m + n * r * r),
        "dense": 3 * tokens * m * n + 2 * (m * r * n + min(m, n) * r * r) + trained * (2 * m * n * r + (m + n) * r * r),
    }
    best = PATHS[0]
    for path in PATHS[1:]:          # min() by hand: torch.compile traces comparisons of symbolic ranks, not min(key=)
        if costs[path] < costs[best]:
            best = path
    return best


@contextmanager
def force_path(path: str) -> Iterator[None]:
    """Inside the block every factored layer applies its weight by ``path`` (one of :data:`PATHS`) instead of
    :func:`forward_path`'s cheapest choice: for timing the paths against each other, or checking that they agree.
    Not thread-safe (one setting for the process)."""
    global _forced_path
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def rebuild(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """``W = U Σ Vᵀ (m×n)``, multiplied in the cheaper order: ``U (Σ Vᵀ)`` costs ``n·r² + m·r·n``,
    ``(U Σ) Vᵀ`` costs ``m·r² + m·r·n``."""
    if V.shape[0] <= U.shape[0]:
        return U @ (S @ V.mT)
    return (U @ S) @ V.mT


class LowRankLayer(nn.Module):
    """Holds the factors of one weight matrix ``W (m×n) = U Σ Vᵀ``.

    ``lowrank_U (m×r)`` and ``lowrank_V (n×r)`` are frozen Parameters (``requires_grad=False``: no gradient, no
    optimizer state; the controller lets them train with ``OIALRConfig(train_bases=True)``); ``lowrank_S`` is
    ``Σ (r×r)``, a full square trainable matrix. Subclasses hold the rest of the original layer (its bias Parameter
    object, strides, ...) and implement ``forward``, ``to_dense`` and ``_two_layers``.
    """

    def __init__(self, U: Tensor, S: Tensor, V: Tensor) -> None:
        super().__init__()
        self._check_factors(U, S, V)
        dynamic_ranks()                             # torch.compile: one graph for every rank
        self.lowrank_U = nn.Parameter(U, requires_grad=False)
        self.lowrank_S = nn.Parameter(S)
        self.lowrank_V = nn.Parameter(V, requires_grad=False)

    @staticmethod
    def _check_factors(U: Tensor, S: Tensor, V: Tensor) -> None:
        r = S.shape[0]
        if U.dim() != 2 or V.dim() != 2 or S.shape != (r, r) or U.shape[1] != r or V.shape[1] != r:
            raise ValueError(f"factors must be U (m×r), S (r×r), V (n×r) with one r; got U {tuple(U.shape)}, "
                             f"S {tuple(S.shape)}, V {tuple(V.shape)}")

    @property
    def rank(self) -> int:
        return self.lowrank_S.shape[0]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)`` of the weight seen as a matrix ``out × rest``."""
        return self.lowrank_U.shape[0], self.lowrank_V.shape[0]

    def dense_matrix(self) -> Tensor:
        """``W = U Σ Vᵀ`` as an ``m×n`` matrix (differentiable in ``Σ``)."""
        return rebuild(self.lowrank_U, self.lowrank_S, self.lowrank_V)

    def path(self, tokens: int, rows: int | None = None) -> str:
        """:func:`forward_path` for ``tokens`` input rows (and ``rows`` of the ``m`` outputs), or the path that
        :func:`force_path` set."""
        if _forced_path is not None:
            return _forced_path
        m, n = self.matrix_shape
        return forward_path(tokens, m if rows is None else rows, n, self.rank, self.lowrank_U.requires_grad)

    @torch.no_grad()
    def set_factors(self, U: Tensor, S: Tensor, V: Tensor) -> bool:
        """Replace the factors; return whether the Parameter objects were replaced. Same rank: copied in place
        (Parameters kept, False). New rank: new Parameters in the old ones' dtype and device (True; the caller
        moves ``Σ``'s optimizer entry to the new ``lowrank_S`` and rebuilds any wrapper holding the old ones). New
        ``U``, ``V`` train if the old ones did (``OIALRConfig(train_bases=True)``)."""
        self._check_factors(U, S, V)
        if U.shape[0] != self.lowrank_U.shape[0] or V.shape[0] != self.lowrank_V.shape[0]:
            raise ValueError(f"new factors have matrix shape {(U.shape[0], V.shape[0])}, "
                             f"layer has {self.matrix_shape}")
        if S.shape == self.lowrank_S.shape:
            self.lowrank_U.copy_(U)
            self.lowrank_S.copy_(S)
            self.lowrank_V.copy_(V)
            return False
        ref, bases_train = self.lowrank_S, self.lowrank_U.requires_grad
        self.lowrank_U = nn.Parameter(U.to(ref), requires_grad=bases_train)
        self.lowrank_S = nn.Parameter(S.to(ref), requires_grad=ref.requires_grad)
        self.lowrank_V = nn.Parameter(V.to(ref), requires_grad=bases_train)
        return True

    def with_factors(self, U: nn.Parameter, S: nn.Parameter, V: nn.Parameter) -> LowRankLayer:
        """A new layer of this kind holding the Parameter objects ``U``, ``Σ``, ``V`` themselves (an optimizer may
        hold them) and this layer's bias Parameter object and settings. For a rank change of a layer sharded by
        FSDP2, whose units keep the Parameters they were built with (:mod:`oialr.sharding`)."""
        new = self._like(U, S, V)
        new.lowrank_U, new.lowrank_S, new.lowrank_V = U, S, V
        return new.train(self.training)

    def _like(self, U: Tensor, S: Tensor, V: Tensor) -> LowRankLayer:
        """A layer of this kind with factors ``U``, ``S``, ``V`` and this layer's bias Parameter and settings."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _like, which a rank change under "
                                  "FSDP2 needs (LowRankLayer.with_factors); implement it, or train with DDP")

    def to_compact(self) -> nn.Module:
        """The plain-torch form storing the fewest parameters: two layers, ``Σ Vᵀ (r×n)`` then ``U (m×r)`` (and the
        bias), when ``r·(m + n) < m·n``; else :meth:`to_dense`. Same function as this layer."""
        m, n = self.matrix_shape
        return self.to_dense() if self.rank * (m + n) >= m * n else self.to_two_layers()

    def to_two_layers(self) -> nn.Sequential:
        """Two plain layers of the original type, ``Σ Vᵀ (r×n)`` then ``U (m×r)`` and the bias, whatever their
        size (:meth:`to_compact` uses them where they are smaller than the dense layer)."""
        trains = self.lowrank_S.requires_grad
        with torch.no_grad():
            first = nn.Parameter((self.lowrank_S @ self.lowrank_V.mT).contiguous(), requires_grad=trains)
            last = nn.Parameter(self.lowrank_U.detach().clone(), requires_grad=trains)
        return self._two_layers(first, last)

    def _two_layers(self, first: nn.Parameter, last: nn.Parameter) -> nn.Sequential:
        """``x ↦ last · (first · x) + b`` as two layers of the original type (``first (r×n)``, ``last (m×r)``)."""
        raise NotImplementedError

    def _as_dense(self, layer: nn.Module) -> nn.Module:
        """Give a freshly built dense ``layer`` this layer's weight ``U Σ Vᵀ`` and its bias Parameter object."""
        layer.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self.lowrank_S.requires_grad)
        if self.bias is not None:
            layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        m, n = self.matrix_shape
        return f"matrix={m}x{n}, rank={self.rank}"
