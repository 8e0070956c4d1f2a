"""LowRankConv: a Conv1d/2d/3d layer (groups = 1) whose kernel, seen as a matrix, is ``U Σ Vᵀ``."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LowRankLayer

_CONV = {1: (F.conv1d, nn.Conv1d), 2: (F.conv2d, nn.Conv2d), 3: (F.conv3d, nn.Conv3d)}


class LowRankConv(LowRankLayer):
    """Convolution with kernel ``K (c_out, c_in, *k)`` where ``K.view(c_out, c_in·Πk) = U Σ Vᵀ``.

    Per call, the cheapest of (:func:`forward_path`, from the number of output positions)::

        chain   a conv with the ``r`` kernels ``Vᵀ`` viewed as ``(r, c_in, *k)`` (the original stride, padding,
                dilation), then a 1×1 conv with ``U Σ`` viewed as ``(c_out, r, 1, ...)`` plus the bias
        merged  a conv with the kernels ``Σ Vᵀ``, then a 1×1 conv with ``U``
        dense   the conv with the rebuilt kernel ``K``
    (Unlike a matmul, a convolution keeps its input for the backward pass even when its kernel is frozen, so ``Σ`` is
    folded into one of the two convolutions: the factored paths keep ``x`` and ``h (N, r, *out)``, never a third
    tensor. Their multiply-adds differ from the Linear paths' by ``O(r²·(m + n))``, which the cost model ignores.)
    ``bias`` is the original layer's Parameter object.
    """

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, bias: nn.Parameter | None, conv: nn.Conv1d) -> None:
        super().__init__(U, S, V)
        dims = len(conv.kernel_size)
        if conv.groups != 1 or dims not in _CONV:
            raise ValueError(f"LowRankConv supports Conv1d/2d/3d with groups=1, got {conv}")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.bias = bias

    @property
    def weight(self) -> Tensor:
        """The dense kernel ``(c_out, c_in, *k)`` (computed; for code that reads ``.weight``)."""
        return self.dense_matrix().view(self.out_channels, self.in_channels, *self.kernel_size)

    def _output_positions(self, x: Tensor, padding: tuple[int, ...] | str | int) -> int:
        """Batch × output positions of the convolution of ``x`` (the ``tokens`` of the cost model)."""
        dims = len(self.kernel_size)
        spatial = x.shape[-dims:]
        if padding == "same":
            positions = math.prod(spatial)
        else:
            pad = (0,) * dims if padding in ("valid", 0) else padding
            positions = math.prod([(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d       # a list:
                                   in zip(spatial, self.kernel_size, self.stride, pad, self.dilation)])  # compiles
        return max(math.prod(x.shape[:-dims - 1]) * positions, 1)

    def forward(self, x: Tensor) -> Tensor:
        dims = len(self.kernel_size)
        conv, _ = _CONV[dims]
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        U, S, V = self.lowrank_U, self.lowrank_S, self.lowrank_V
        path = self.path(self._output_positions(x, padding))
        if path == "dense":
            return conv(x, self.weight, self.bias, self.stride, padding, self.dilation)
        first, last = (V.mT, U @ S) if path == "chain" else (S @ V.mT, U)                    # (r, c_in·Πk), (m, r)
        h = conv(x, first.reshape(self.rank, self.in_channels, *self.kernel_size), None, self.stride, padding,
                 self.dilation)                                                              # (N, r, *out)
        return conv(h, last.reshape(*last.shape, *(1,) * dims), self.bias)                   # (N, c_out, *out)

    def _like(self, U: Tensor, S: Tensor, V: Tensor) -> LowRankConv:
        _, cls = _CONV[len(self.kernel_size)]
        settings = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                       padding=self.padding, dilation=self.dilation, bias=False, padding_mode=self.padding_mode,
                       device="meta")
        return LowRankConv(U, S, V, self.bias, settings)

    def to_dense(self) -> nn.Conv1d:
        """The matching ``nn.ConvNd`` with kernel ``U Σ Vᵀ`` and this layer's bias Parameter."""
        S = self.lowrank_S
        _, cls = _CONV[len(self.kernel_size)]
        layer = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
                    device=S.device, dtype=S.dtype)
        return self._as_dense(layer)

    def _two_layers(self, first: nn.Parameter, last: nn.Parameter) -> nn.Sequential:
        """``ConvNd(c_in, r)`` with the original kernel size, stride, padding and dilation and kernels ``first``, then
        a 1×1 ``ConvNd(r, c_out)`` with ``last`` and the bias."""
        dims = len(self.kernel_size)
        _, cls = _CONV[dims]
        down = cls(self.in_channels, self.rank, self.kernel_size, stride=self.stride, padding=self.padding,
                   dilation=self.dilation, bias=False, padding_mode=self.padding_mode, device="meta")
        up = cls(self.rank, self.out_channels, 1, bias=self.bias is not None, device="meta")
        down.weight = nn.Parameter(first.view(self.rank, self.in_channels, *self.kernel_size),
                                   requires_grad=first.requires_grad)
        up.weight = nn.Parameter(last.view(self.out_channels, self.rank, *(1,) * dims),
                                 requires_grad=last.requires_grad)
        if self.bias is not None:
            up.bias = self.bias
        return nn.Sequential(down, up)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, " \
               f"padding={self.padding}, rank={self.rank}, bias={self.bias is not None}"
