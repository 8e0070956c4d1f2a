"""transformers' ``Conv1D`` (GPT-2's layers) as an OIALR layer type: call :func:`register` once."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..factorize import Factors
from ..layer_types import LayerType, register_layer_type
from ..layers import LowRankLinear

try:
    from transformers.pytorch_utils import Conv1D
except ImportError as err:
    raise ImportError("oialr.integrations.hf_conv1d needs transformers: pip install oialr[hf]") from err


class LowRankConv1D(LowRankLinear):
    """A transformers ``Conv1D(nf=m, nx=n)`` (``y = x Wᵀ + b`` with the weight stored as ``Wᵀ (n×m)``) whose
    ``W (m×n) = U Σ Vᵀ``; it computes like :class:`oialr.LowRankLinear` and merges back to a ``Conv1D``."""

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, bias: nn.Parameter | None) -> None:
        super().__init__(U, S, V, bias)
        self.nf, self.nx = self.out_features, self.in_features

    @property
    def weight(self) -> Tensor:
        """The weight as ``Conv1D`` stores it, ``Wᵀ (n×m)`` (computed; for code that reads ``.weight``)."""
        return self.dense_matrix().mT

    def _like(self, U: Tensor, S: Tensor, V: Tensor) -> LowRankConv1D:
        return LowRankConv1D(U, S, V, self.bias)

    def to_dense(self) -> Conv1D:
        """A ``Conv1D`` with weight ``(U Σ Vᵀ)ᵀ`` and this layer's bias Parameter."""
        S = self.lowrank_S
        with torch.device("meta"):                  # nothing allocated: both Parameters are replaced
            layer = Conv1D(self.out_features, self.in_features)
        with torch.no_grad():
            layer.weight = nn.Parameter(self.dense_matrix().mT.contiguous(), requires_grad=S.requires_grad)
        layer.bias = self.bias
        return layer


def _build(module: Conv1D, factors: Factors) -> LowRankConv1D:
    return LowRankConv1D(*factors, bias=module.bias)


def _matrix(weight: Tensor) -> Tensor:
    return weight.mT


CONV1D = LayerType("hf_conv1d", Conv1D, LowRankConv1D, _build, matrix=_matrix)


def register() -> None:
    """Teach oialr transformers' ``Conv1D`` (kind ``"hf_conv1d"``); calling it again does nothing."""
    register_layer_type(CONV1D)
