"""Factored layers: each holds ``U`` (frozen), ``Σ`` (trainable) and ``V`` (frozen) of one weight."""
from .base import PATHS, LowRankLayer, force_path, forward_path
from .linear import LowRankLinear
from .conv import LowRankConv
from .attention import LowRankMultiheadAttention

__all__ = ["LowRankLayer", "LowRankLinear", "LowRankConv", "LowRankMultiheadAttention", "forward_path", "force_path",
           "PATHS"]
