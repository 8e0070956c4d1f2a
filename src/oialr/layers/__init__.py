"""Factored layers: each holds ``U`` (frozen), ``Σ`` (trainable) and ``V`` (frozen) of one weight."""
from .base import LowRankLayer, factored_is_cheaper
from .linear import LowRankLinear
from .conv import LowRankConv
from .attention import LowRankMultiheadAttention

__all__ = ["LowRankLayer", "LowRankLinear", "LowRankConv", "LowRankMultiheadAttention", "factored_is_cheaper"]
