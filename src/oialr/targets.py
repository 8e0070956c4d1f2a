"""Which layers OIALR converts: the weight matrices of a model, the targeting rules, and one resolver from a layer
name to its weight."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from torch import Tensor, nn

from . import linalg
from .config import OIALRConfig
from .dense_modules import UNKNOWN_TYPE, other_modules, qualified_name, unregistered_hint
from .factorize import stored_params
from .layer_types import dense_type_of, factored_type_of, registered_layer_types
from .layers import LowRankLayer, LowRankMultiheadAttention

SUPPORTED = "nn.Linear, nn.Conv1d/2d/3d (groups=1), nn.MultiheadAttention projections and registered layer types"
MHA_PROJECTIONS = ("in_proj", "q_proj", "k_proj", "v_proj", "out_proj")
OTHER = "other"     # the kind of rows for parameter-holding modules OIALR does not convert (see oialr.dense_modules)


@dataclass
class LayerInfo:
    """One weight matrix a model holds and what OIALR does with it, or (``kind == "other"``) a module holding
    parameters OIALR does not convert (``shape`` None, ``params`` its parameter entries)."""

    name: str                 # qualified name of the layer holding the weight, e.g. "blocks.0.attn.qkv"
    kind: str                 # "linear" | "conv" | "attention" | a registered kind | "other"
    shape: tuple[int, int] | None   # (m, n): the weight viewed as a matrix out × rest; None for "other"
    convert: bool
    reason: str = ""          # why it stays dense, when it does
    params: int = 0           # "other" rows: the module's own parameter entries

    @property
    def dense_params(self) -> int:
        return self.params if self.shape is None else self.shape[0] * self.shape[1]


def find_layers(model: nn.Module, config: OIALRConfig) -> list[LayerInfo]:
    """Every weight of a supported layer type in registration order, each marked convert or dense (with the reason),
    and between them, as rows of kind ``"other"``, every module holding parameters of a type OIALR does not
    convert (embeddings, norms, recurrent layers, unregistered types; :func:`oialr.dense_modules.other_modules`).

    Rules, in order: frozen weights, weights shared (tied) with another module, ``exclude_modules``,
    ``target_modules``, the output layer (``keep_output_layer_dense``), ``max_aspect_ratio``.
    """
    owners = parameter_owners(model)
    for name, module in model.named_modules():
        if isinstance(module, (LowRankLayer, LowRankMultiheadAttention)):
            raise ValueError(f"module {name!r} is already an OIALR layer ({type(module).__name__}); build the "
                             "controller on the dense model and restore a run with OIALR.load_state_dict")
    order = {id(module): i for i, module in enumerate(model.modules())}
    rows: list[tuple[int, LayerInfo]] = []
    for name, module, weight, kind in weight_layers(model):
        m, n = as_matrix(module, weight).shape
        info = LayerInfo(name, kind, (m, n), convert=True)
        entry = dense_type_of(module)
        reason = entry.dense_reason(module) if entry is not None else None
        if not name:
            info.convert, info.reason = False, "the model itself (wrap it in nn.Sequential to convert it)"
        elif min(m, n) == 0:
            info.convert, info.reason = False, "empty weight (a dimension of size 0)"
        elif _overrides_forward(module):
            info.convert, info.reason = False, f"{type(module).__name__} overrides forward (custom layer)"
        elif reason:
            info.convert, info.reason = False, reason
        elif not weight.requires_grad:
            info.convert, info.reason = False, "frozen weight (requires_grad=False)"
        elif len(owners.get(id(weight), [])) > 1:
            info.convert, info.reason = False, "weight shared with " + ", ".join(sorted(owners[id(weight)]))
        elif _matches(name, config.exclude_modules):
            info.convert, info.reason = False, "exclude_modules"
        elif config.target_modules is not None and not _matches(name, config.target_modules):
            info.convert, info.reason = False, "not in target_modules"
        elif config.max_aspect_ratio is not None and max(m, n) / min(m, n) >= config.max_aspect_ratio:
            info.convert, info.reason = False, f"aspect ratio {max(m, n) / min(m, n):.1f} >= max_aspect_ratio"
        rows.append((order[id(module)], info))
    weights = [info for _, info in rows]
    if config.keep_output_layer_dense and weights and weights[-1].convert:
        weights[-1].convert, weights[-1].reason = False, "output layer (keep_output_layer_dense)"
    rows += [(order[id(module)], LayerInfo(name, OTHER, None, convert=False, reason=reason, params=params))
             for name, module, reason, params in other_modules(model, owners)]
    return [info for _, info in sorted(rows, key=lambda row: row[0])]


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every qualified name it is registered under`` (each module once: a shared module is no
    tie)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    return owners


def as_matrix(module: nn.Module, tensor: Tensor) -> Tensor:
    """``tensor`` (the weight of the dense layer ``module``, or a tensor shaped like it) viewed as the matrix
    ``out × rest`` of its registered layer type (an attention projection or a factored ``Σ``: as is)."""
    entry = None if isinstance(module, LowRankLayer) else dense_type_of(module)
    return (entry.matrix if entry is not None else linalg.matrix_view)(tensor)


def weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Tensor, str]]:
    """Every weight matrix of a supported layer type, dense or factored, in registration order, as
    ``(name, module, weight, kind)``: the registered layer types (:mod:`oialr.layer_types`: ``nn.Linear``,
    ``nn.Conv1d/2d/3d`` of any ``groups``, and those an integration added), the projections of an
    ``nn.MultiheadAttention`` (``<mha>.in_proj`` or ``<mha>.q_proj``/``k_proj``/``v_proj``, and ``<mha>.out_proj``,
    with ``module`` the attention module), and factored layers (``weight`` is then ``Σ``). A converted
    :class:`LowRankMultiheadAttention` holds its projections as child modules under the same names."""
    skip_prefix = None
    attention_prefixes: list[str] = []
    for name, module in model.named_modules():
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        skip_prefix = None
        if isinstance(module, nn.MultiheadAttention):
            skip_prefix = f"{name}."
            joint = module._qkv_same_embed_dim
            projections = [("in_proj", module.in_proj_weight)] if joint else [
                ("q_proj", module.q_proj_weight), ("k_proj", module.k_proj_weight), ("v_proj", module.v_proj_weight)]
            for pname, weight in projections + [("out_proj", module.out_proj.weight)]:
                yield _join(name, pname), module, weight, "attention"
            continue
        if isinstance(module, LowRankMultiheadAttention):
            attention_prefixes.append(f"{name}.")
            continue
        in_attention = any(name.startswith(p) for p in attention_prefixes)
        factored = factored_type_of(module)
        entry = factored or dense_type_of(module)
        if entry is not None:
            weight = module.lowrank_S if factored else module.weight
            yield name, module, weight, "attention" if in_attention else entry.kind


def layer_weight(model: nn.Module, name: str) -> tuple[nn.Module, Tensor]:
    """The module holding the weight matrix ``name`` (a :func:`weight_layers` name) and that weight, resolved
    against ``model`` now (so it follows modules OIALR replaced): a layer of a registered type and its ``weight``;
    an ``nn.MultiheadAttention`` and one of its projection weights; a factored layer and its ``Σ``."""
    parent_name, _, child = name.rpartition(".")
    parent = _submodule_or_none(model, parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child in MHA_PROJECTIONS:
        weight = parent.out_proj.weight if child == "out_proj" else getattr(parent, f"{child}_weight")
        if weight is not None:
            return parent, weight
    module = _submodule_or_none(model, name)
    if isinstance(module, LowRankLayer):
        return module, module.lowrank_S
    if module is not None and dense_type_of(module) is not None:
        return module, module.weight
    found = "nothing" if module is None else f"a {type(module).__name__}"
    raise ValueError(f"layer {name!r}: expected a layer of a registered type ({', '.join(registered_layer_types())})"
                     ", an OIALR factored layer or an attention projection '<mha>.in_proj' / 'q_proj' / 'k_proj' / "
                     f"'v_proj' / 'out_proj', found {found}; use a name from oialr.stability.layer_names(model)")


def no_target_message(model: nn.Module, layers: list[LayerInfo]) -> str:
    """Why OIALR finds nothing to convert in ``model``: every row of :func:`find_layers` with its reason, and the
    parameter-holding layer types it does not know with how to register them."""
    found = "\n".join(f"  {i.name or '(the model)'} ({i.kind}" + (f" {i.shape[0]}x{i.shape[1]}" if i.shape else "")
                      + f"): {i.reason}" for i in layers)
    text = f"no layer of the model can be converted; OIALR converts {SUPPORTED}.\n" + \
        (f"Layers found and why they stay dense:\n{found}" if found else "None was found.")
    unknown = {}
    for info in layers:
        module = model.get_submodule(info.name)
        if info.kind == OTHER and UNKNOWN_TYPE in info.reason:
            unknown.setdefault(qualified_name(type(module)), unregistered_hint(module))
    if unknown:
        text += "\nParameter-holding layer types OIALR does not know: " + "; ".join(
            f"{cls} ({hint})" for cls, hint in unknown.items())
    return text


def _submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _overrides_forward(module: nn.Module) -> bool:
    """True for a subclass of a supported type that computes something else (e.g. timm's weight-standardized
    ``StdConv2d``): replacing it by a plain factored layer would silently change the model."""
    entry = dense_type_of(module)
    bases = (nn.MultiheadAttention,) if entry is None else entry.dense if isinstance(entry.dense, tuple) \
        else (entry.dense,)
    for base in bases:
        if isinstance(module, base):
            return any(getattr(type(module), m) is not getattr(base, m)
                       for m in ("forward", "_conv_forward") if hasattr(base, m))
    return False


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    """PEFT-style targeting: a string is a full regex match; a list matches exact names or dotted suffixes."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def trainable_params(model: nn.Module) -> int:
    """Entries of the Parameters that train (``requires_grad``), each shared Parameter once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_sizes(layers: list[LayerInfo], ranks: dict[str, int], train_bases: bool = False) -> dict[str, dict]:
    """Per layer to convert: rank (``ranks`` for the factored ones, else full), full rank, shape ``[m, n]`` and the
    parameters it holds dense (``m·n``), stores (``r·(m + n + r)`` factored) and trains (``r²``, or all it stores with
    ``train_bases``), as plain values."""
    sizes = {}
    for info in layers:
        if not info.convert:
            continue
        (m, n), r = info.shape, ranks.get(info.name)
        stored = m * n if r is None else stored_params(m, n, r)
        sizes[info.name] = {"rank": min(m, n) if r is None else r, "full_rank": min(m, n), "shape": [m, n],
                            "dense_params": m * n, "stored_params": stored,
                            "trainable_params": stored if r is None or train_bases else r * r}
    return sizes


def format_table(layers: list[LayerInfo], ranks: dict[str, int] | None = None) -> str:
    """A plain-text table: name, kind, matrix shape, rank / full rank, parameters dense -> stored, note."""
    ranks = ranks or {}
    rows = [("layer", "kind", "shape", "rank", "dense params", "stored params", "note")]
    for info in layers:
        if info.shape is None:
            params = f"{info.params:,}"
            rows.append((info.name, info.kind, "-", "-", params, params, info.reason))
            continue
        m, n = info.shape
        full = min(m, n)
        r = ranks.get(info.name)
        stored = info.dense_params if r is None else stored_params(m, n, r)
        rank = f"{r}/{full}" if r is not None else f"{full}/{full}"
        note = info.reason if not info.convert else ("factored" if r is not None else "to convert")
        rows.append((info.name, info.kind, f"{m}x{n}", rank, f"{info.dense_params:,}", f"{stored:,}", note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
