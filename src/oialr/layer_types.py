"""The registry of layer types OIALR converts: how to recognise one, read its weight as a matrix, build its factored
form (which knows how to merge back). ``nn.Linear`` and ``nn.Conv1d/2d/3d`` are registered here; an integration
registers more (``oialr.integrations.hf_conv1d`` for transformers' ``Conv1D``). ``nn.MultiheadAttention`` holds
several weights and is handled by :mod:`oialr.targets` itself (its projections become ``"linear"`` layers)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from . import linalg
from .factorize import Factors
from .layers import LowRankConv, LowRankLayer, LowRankLinear


def _always_eligible(module: nn.Module) -> str | None:
    return None


@dataclass(frozen=True)
class LayerType:
    """How OIALR treats one type of layer holding one weight matrix in its ``weight`` Parameter.

    ``kind``: a short name (``"linear"``), shown by :func:`oialr.find_layers` and written to ``oialr_config.json``.
    ``dense``: the module class(es) recognised (``isinstance``; a subclass that overrides ``forward`` stays dense).
    ``factored``: the :class:`oialr.LowRankLayer` subclass built for it; its ``to_dense`` returns a module of the
    ``dense`` type, its ``to_compact`` plain torch layers.
    ``build(module, factors)``: the factored layer for ``module`` holding ``factors`` (``U (m×r)``, ``Σ (r×r)``,
    ``V (n×r)``) and ``module``'s bias Parameter object.
    ``matrix(weight)``: the weight viewed as the matrix ``W (m×n)`` with ``y = x Wᵀ + b``, i.e. ``out × rest``
    (default: ``weight.reshape(weight.shape[0], -1)``; transformers' ``Conv1D`` stores ``Wᵀ`` and gives
    ``weight.mT``). Also applied to optimizer state shaped like the weight.
    ``dense_reason(module)``: why this module stays dense (e.g. ``"grouped conv (groups=2)"``), or ``None``.
    """

    kind: str
    dense: type | tuple[type, ...]
    factored: type[LowRankLayer]
    build: Callable[[nn.Module, Factors], LowRankLayer]
    matrix: Callable[[Tensor], Tensor] = linalg.matrix_view
    dense_reason: Callable[[nn.Module], str | None] = _always_eligible

    def __post_init__(self) -> None:
        if not self.kind or not self.kind.isidentifier() or self.kind in RESERVED_KINDS:
            raise ValueError(f"kind must be an identifier other than {', '.join(RESERVED_KINDS)}, got {self.kind!r}")
        if not (isinstance(self.factored, type) and issubclass(self.factored, LowRankLayer)):
            raise TypeError(f"factored must be a subclass of oialr.LowRankLayer, got {self.factored!r}")


RESERVED_KINDS = ("attention", "other", "compact")   # kinds oialr uses for rows that are not a registered type
_REGISTRY: dict[str, LayerType] = {}


def register_layer_type(layer_type: LayerType) -> None:
    """Teach OIALR a layer type. Registering an equal ``LayerType`` again does nothing; another one under a kind
    already taken is refused. A later registration is consulted first (register a subclass after its base)."""
    if not isinstance(layer_type, LayerType):
        raise TypeError(f"register_layer_type takes an oialr.LayerType, got {type(layer_type).__name__}")
    known = _REGISTRY.get(layer_type.kind)
    if known is not None and known != layer_type:
        raise ValueError(f"layer type {layer_type.kind!r} is already registered as {known}; choose another kind")
    _REGISTRY[layer_type.kind] = layer_type


def registered_layer_types() -> dict[str, LayerType]:
    """Every registered layer type by kind, in registration order."""
    return dict(_REGISTRY)


def layer_type(kind: str) -> LayerType:
    """The registered layer type ``kind``; ``ValueError`` naming the registered ones if there is none."""
    if kind not in _REGISTRY:
        raise ValueError(f"layer type {kind!r} is not registered (registered: {', '.join(_REGISTRY)}); register it "
                         "first with oialr.register_layer_type (transformers' Conv1D: "
                         "oialr.integrations.hf_conv1d.register())")
    return _REGISTRY[kind]


def dense_type_of(module: nn.Module) -> LayerType | None:
    """The layer type whose ``dense`` class ``module`` is an instance of (the latest registered first), or None."""
    for entry in reversed(_REGISTRY.values()):
        if isinstance(module, entry.dense):
            return entry
    return None


def factored_type_of(module: nn.Module) -> LayerType | None:
    """The layer type whose ``factored`` class ``module`` is an instance of (the latest registered first), or None."""
    for entry in reversed(_REGISTRY.values()):
        if isinstance(module, entry.factored):
            return entry
    return None


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _build_linear(module: nn.Linear, factors: Factors) -> LowRankLinear:
    return LowRankLinear(*factors, bias=module.bias)


def _build_conv(module: nn.Conv2d, factors: Factors) -> LowRankConv:
    return LowRankConv(*factors, bias=module.bias, conv=module)


def _conv_reason(module: nn.Conv2d) -> str | None:
    return f"grouped conv (groups={module.groups})" if module.groups != 1 else None


register_layer_type(LayerType("linear", nn.Linear, LowRankLinear, _build_linear))
register_layer_type(LayerType("conv", CONVS, LowRankConv, _build_conv, dense_reason=_conv_reason))
