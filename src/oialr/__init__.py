"""oialr: Orthogonality-Informed Adaptive Low-Rank training for PyTorch."""
from . import distributed
from .config import OIALRConfig
from .controller import OIALR
from .convert import compact_lowrank, find_layers, format_table, merge_lowrank
from .layers import LowRankConv, LowRankLayer, LowRankLinear, LowRankMultiheadAttention
from .stability import PlateauRule, StabilityTracker, basis_stability

__version__ = "0.1.0"

__all__ = [
    "OIALR",
    "OIALRConfig",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankConv",
    "LowRankMultiheadAttention",
    "find_layers",
    "format_table",
    "merge_lowrank",
    "compact_lowrank",
    "basis_stability",
    "StabilityTracker",
    "PlateauRule",
    "distributed",
]
