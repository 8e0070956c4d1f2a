"""oialr: Orthogonality-Informed Adaptive Low-Rank training for PyTorch."""
from . import distributed
from .auto_transition import AutoTransition, PlateauRule
from .config import OIALRConfig
from .controller import OIALR
from .convert import compact_lowrank, merge_lowrank
from .health import DegenerateStateError
from .layer_types import LayerType, register_layer_type, registered_layer_types
from .pretrained import from_pretrained, save_pretrained
from .layers import LowRankConv, LowRankLayer, LowRankLinear, LowRankMultiheadAttention, force_path
from .stability import StabilityTracker
from .stability_metrics import basis_stability
from .targets import find_layers, format_table

__version__ = "0.1.0"

__all__ = [
    "OIALR",
    "OIALRConfig",
    "AutoTransition",
    "DegenerateStateError",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankConv",
    "LowRankMultiheadAttention",
    "find_layers",
    "format_table",
    "merge_lowrank",
    "compact_lowrank",
    "force_path",
    "basis_stability",
    "StabilityTracker",
    "PlateauRule",
    "distributed",
    "LayerType",
    "register_layer_type",
    "registered_layer_types",
    "save_pretrained",
    "from_pretrained",
]
