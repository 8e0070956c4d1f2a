"""The modules that hold parameters OIALR never converts (embeddings, norms, recurrent layers, unregistered layer
types), each with its parameter count and the reason, for :func:`oialr.find_layers` and ``ctl.table()``."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .layer_types import dense_type_of, factored_type_of
from .layers import LowRankMultiheadAttention

UNKNOWN_TYPE = "is not a layer type OIALR knows"
# layer types an oialr integration teaches: qualified class name -> the call that registers it
INTEGRATIONS = {"transformers.pytorch_utils.Conv1D": "oialr.integrations.hf_conv1d.register()"}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def unregistered_hint(module: nn.Module) -> str:
    """How to teach OIALR the type of ``module``."""
    call = INTEGRATIONS.get(qualified_name(type(module)))
    return f"register it with {call}" if call else "teach oialr this type with oialr.register_layer_type"


def other_modules(model: nn.Module, owners: dict[int, list[str]]) -> Iterator[tuple[str, nn.Module, str, int]]:
    """``(name, module, reason, parameter entries)`` for every module holding parameters itself (not through children)
    that is neither a registered layer type, a factored layer nor an attention module (or inside one), in
    registration order. ``owners``: :func:`oialr.targets.parameter_owners` of ``model``, to name tied weights."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, (nn.MultiheadAttention, LowRankMultiheadAttention)):
            inside = (*inside, f"{name}.")
            continue
        if dense_type_of(module) is not None or factored_type_of(module) is not None:
            continue
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        reason = _reason(module, [p for _, p in params])
        shared = sorted({other for pname, p in params for other in owners.get(id(p), [])
                         if other != (f"{name}.{pname}" if name else pname)})
        if shared:
            reason += "; shares parameters with " + ", ".join(shared)
        yield name, module, reason, sum(p.numel() for _, p in params)


def _reason(module: nn.Module, params: list[nn.Parameter]) -> str:
    kind = type(module).__name__
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{kind}: embedding (a lookup table, not a matrix product)"
    if isinstance(module, nn.RNNBase):
        return f"{kind}: recurrent layer (not supported)"
    if all(p.dim() <= 1 for p in params):
        return f"{kind}: 1-D parameters only (norm scales and shifts, biases)"
    if next(module.children(), None) is not None:
        return f"{kind}: parameters held by the module itself, not by a layer"
    return f"{kind} ({qualified_name(type(module))}) {UNKNOWN_TYPE}; {unregistered_hint(module)}"
