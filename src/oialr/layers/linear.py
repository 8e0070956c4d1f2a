"""LowRankLinear: a Linear layer whose weight is ``U Σ Vᵀ``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LowRankLayer, rebuild


class LowRankLinear(LowRankLayer):
    """``y = x Wᵀ + b`` with ``W (out×in) = U Σ Vᵀ``; ``U (out×r)``, ``Σ (r×r)``, ``V (in×r)``.

    Per call, the cheapest of (:func:`forward_path`, from the number of rows of ``x``)::

        chain   h = x V  (…, r);  h ← h Σᵀ;  y = h Uᵀ + b
        merged  h = x (Σ Vᵀ)ᵀ  (…, r);  y = h Uᵀ + b
        dense   y = x (U Σ Vᵀ)ᵀ + b

    ``bias`` is the original layer's Parameter object, so it stays in the optimizer and keeps training.
    """

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, bias: nn.Parameter | None) -> None:
        super().__init__(U, S, V)
        self.in_features = V.shape[0]
        self.out_features = U.shape[0]
        self.bias = bias

    @property
    def weight(self) -> Tensor:
        """The dense weight ``U Σ Vᵀ`` (computed; for code that reads ``.weight``)."""
        return self.dense_matrix()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_rows(x, slice(None))

    def forward_rows(self, x: Tensor, rows: slice) -> Tensor:
        """Output features ``rows`` only: ``x (U[rows] Σ Vᵀ)ᵀ + b[rows]`` (used for attention's q/k/v slices)."""
        U = self.lowrank_U[rows]
        bias = None if self.bias is None else self.bias[rows]
        S, V = self.lowrank_S, self.lowrank_V
        path = self.path(x.numel() // max(x.shape[-1], 1), rows=U.shape[0])
        if path == "chain":
            h = F.linear(F.linear(x, V.mT), S)                      # (..., r)
            return F.linear(h, U, bias)                             # (..., out)
        if path == "merged":
            return F.linear(F.linear(x, S @ V.mT), U, bias)
        return F.linear(x, rebuild(U, S, V), bias)

    def _like(self, U: Tensor, S: Tensor, V: Tensor) -> LowRankLinear:
        return LowRankLinear(U, S, V, self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``U Σ Vᵀ`` and this layer's bias Parameter."""
        S = self.lowrank_S
        return self._as_dense(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                        device=S.device, dtype=S.dtype))

    def _two_layers(self, first: nn.Parameter, last: nn.Parameter) -> nn.Sequential:
        """``Linear(in, r, bias=False)`` with weight ``first``, then ``Linear(r, out)`` with ``last`` and the bias."""
        down = nn.Linear(self.in_features, self.rank, bias=False, device="meta")
        up = nn.Linear(self.rank, self.out_features, bias=self.bias is not None, device="meta")
        down.weight, up.weight = first, last
        if self.bias is not None:
            up.bias = self.bias
        return nn.Sequential(down, up)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"
