"""Module surgery: swap a layer for its factored form, and export factored layers as plain torch layers (dense, or
compact)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .config import OIALRConfig
from .factorize import Factors, transition_factors
from .layer_types import dense_type_of, factored_type_of
from .layers import LowRankLayer, LowRankMultiheadAttention
from .targets import MHA_PROJECTIONS, as_matrix, layer_weight


def convert_layer(model: nn.Module, name: str, factors: Factors | None = None, *, rank: int | None = None,
                  config: OIALRConfig | None = None) -> tuple[nn.Parameter, LowRankLayer]:
    """Replace the layer ``name`` by a factored layer holding ``factors`` and return ``(old dense weight, new
    layer)``.

    Without ``factors`` they are computed here (:func:`oialr.factorize.transition_factors`: ``rank`` values if
    given, else the rank ``config`` selects). The new layer holds ``U``, ``Σ``, ``V`` and the original bias
    Parameter object. An ``nn.MultiheadAttention`` is first re-expressed, exactly, as a
    :class:`LowRankMultiheadAttention` whose projections are child modules.
    """
    module, weight = layer_weight(model, name)
    if factors is None:
        if rank is None and config is None:
            raise ValueError("convert_layer needs factors, a rank or a config")
        try:
            factors = transition_factors(as_matrix(module, weight), config or OIALRConfig(), rank)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child in MHA_PROJECTIONS:
        parent = LowRankMultiheadAttention.from_torch(parent)
        replace_module(model, parent_name, parent)
    dense = getattr(parent, child)
    layer = dense_type_of(dense).build(dense, factors)
    replace_module(model, name, layer)
    return weight, layer


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at every path where the module now at ``name`` is registered (shared modules included)."""
    old = model.get_submodule(name)
    paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


def merge_lowrank(model: nn.Module) -> nn.Module:
    """Replace every factored layer by the dense layer it computes (``W = U Σ Vᵀ``), in place; returns ``model``.

    For inference or export: the merged model has the original layer types and ``r·(m + n)`` is no longer stored
    per layer but ``m·n``. :func:`compact_lowrank` keeps the smaller of the two.
    """
    return _replace_lowrank(model, lambda layer: layer.to_dense())


def compact_lowrank(model: nn.Module) -> nn.Module:
    """Replace every factored layer by plain torch layers storing the fewest parameters, in place; returns ``model``.

    A layer with ``r·(m + n) < m·n`` becomes ``nn.Sequential`` of two layers of its type (``Σ Vᵀ`` then ``U`` and the
    bias, e.g. ``Linear(n, r, bias=False)``, ``Linear(r, m)``; a conv keeps its kernel, stride and padding in the
    first and adds a 1×1 conv), any other the dense layer. Layers of ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` are merged to dense: these modules read their
    layers' weights themselves (as would a module of yours that reads ``child.weight``: use :func:`merge_lowrank`
    for it). The frozen ``U``, ``V`` and ``Σ`` become ``r·(m + n)`` parameters instead of ``r·(m + n + r)``, and
    the model no longer needs oialr to run or load. Each two-layer ``nn.Sequential`` carries a plain dict
    ``oialr_compact`` (kind, matrix shape, rank) that :func:`oialr.save_pretrained` records.
    """
    return _replace_lowrank(model, compact_layer)


COMPACT_MARK = "oialr_compact"


def compact_layer(layer: LowRankLayer, two_layers: bool = False) -> nn.Module:
    """``layer.to_compact()`` (``layer.to_two_layers()`` with ``two_layers``); a two-layer result is marked with
    ``oialr_compact = {"kind", "matrix_shape", "rank"}`` (a plain attribute: the module stays plain torch)."""
    compact = layer.to_two_layers() if two_layers else layer.to_compact()
    entry = factored_type_of(layer)
    if isinstance(compact, nn.Sequential) and entry is not None:
        setattr(compact, COMPACT_MARK, {"kind": entry.kind, "matrix_shape": list(layer.matrix_shape),
                                        "rank": layer.rank})
    return compact


# torch modules that read their layers' weights themselves (fused fast paths): their factored layers merge to dense
_READ_CHILD_WEIGHTS = (LowRankMultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _replace_lowrank(model: nn.Module, export: Callable[[LowRankLayer], nn.Module]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLayer):
            parent = model.get_submodule(name.rpartition(".")[0])
            replace_module(model, name, module.to_dense() if isinstance(parent, _READ_CHILD_WEIGHTS)
                           else export(module))
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankMultiheadAttention):
            replace_module(model, name, module.to_torch())
    return model
