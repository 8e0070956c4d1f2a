"""Which layers OIALR converts: the weight matrices of a model, the targeting rules, and one resolver from a layer
name to its weight."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from torch import Tensor, nn

from . import linalg
from .config import OIALRConfig
from .factorize import stored_params
from .layers import LowRankConv, LowRankLayer, LowRankMultiheadAttention

SUPPORTED = "nn.Linear, nn.Conv1d/2d/3d (groups=1) and nn.MultiheadAttention projections"
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MHA_PROJECTIONS = ("in_proj", "q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LayerInfo:
    """One weight matrix a model holds and what OIALR does with it."""

    name: str                 # qualified name of the layer holding the weight, e.g. "blocks.0.attn.qkv"
    kind: str                 # "linear" | "conv" | "attention"
    shape: tuple[int, int]    # (m, n): the weight viewed as a matrix out × rest
    convert: bool
    reason: str = ""          # why it stays dense, when it does

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]


def find_layers(model: nn.Module, config: OIALRConfig) -> list[LayerInfo]:
    """Every weight of a supported layer type in registration order, each marked convert or dense (with the reason).

    Rules, in order: frozen weights, weights shared (tied) with another module, ``exclude_modules``,
    ``target_modules``, the output layer (``keep_output_layer_dense``), ``max_aspect_ratio``.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():            # each module once: a shared module is no tie
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for name, module in model.named_modules():
        if isinstance(module, (LowRankLayer, LowRankMultiheadAttention)):
            raise ValueError(f"module {name!r} is already an OIALR layer ({type(module).__name__}); build the "
                             "controller on the dense model and restore a run with OIALR.load_state_dict")
    layers = []
    for name, module, weight, kind in weight_layers(model):
        m, n = linalg.matrix_view(weight).shape
        info = LayerInfo(name, kind, (m, n), convert=True)
        if not name:
            info.convert, info.reason = False, "the model itself (wrap it in nn.Sequential to convert it)"
        elif min(m, n) == 0:
            info.convert, info.reason = False, "empty weight (a dimension of size 0)"
        elif _overrides_forward(module):
            info.convert, info.reason = False, f"{type(module).__name__} overrides forward (custom layer)"
        elif isinstance(module, CONVS) and module.groups != 1:
            info.convert, info.reason = False, f"grouped conv (groups={module.groups})"
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
        layers.append(info)
    if config.keep_output_layer_dense and layers and layers[-1].convert:
        layers[-1].convert, layers[-1].reason = False, "output layer (keep_output_layer_dense)"
    return layers


def weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Tensor, str]]:
    """Every weight matrix of a supported layer type, dense or factored, in registration order, as
    ``(name, module, weight, kind)``: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any ``groups``), the projections of an
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
        if isinstance(module, LowRankLayer):
            kind = "conv" if isinstance(module, LowRankConv) else "attention" if in_attention else "linear"
            yield name, module, module.lowrank_S, kind
        elif isinstance(module, nn.Linear):
            yield name, module, module.weight, "attention" if in_attention else "linear"
        elif isinstance(module, CONVS):
            yield name, module, module.weight, "conv"


def layer_weight(model: nn.Module, name: str) -> tuple[nn.Module, Tensor]:
    """The module holding the weight matrix ``name`` (a :func:`weight_layers` name) and that weight, resolved
    against ``model`` now (so it follows modules OIALR replaced): an ``nn.Linear``/``nn.ConvNd`` and its
    ``weight``; an ``nn.MultiheadAttention`` and one of its projection weights; a factored layer and its ``Σ``."""
    parent_name, _, child = name.rpartition(".")
    parent = _submodule_or_none(model, parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child in MHA_PROJECTIONS:
        weight = parent.out_proj.weight if child == "out_proj" else getattr(parent, f"{child}_weight")
        if weight is not None:
            return parent, weight
    module = _submodule_or_none(model, name)
    if isinstance(module, LowRankLayer):
        return module, module.lowrank_S
    if isinstance(module, (nn.Linear, *CONVS)):
        return module, module.weight
    found = "nothing" if module is None else f"a {type(module).__name__}"
    raise ValueError(f"layer {name!r}: expected an nn.Linear, nn.Conv1d/2d/3d, an OIALR factored layer or an attention "
                     f"projection '<mha>.in_proj' / 'q_proj' / 'k_proj' / 'v_proj' / 'out_proj', found {found}; "
                     "use a name from oialr.stability.layer_names(model)")


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
    for base in (nn.MultiheadAttention, nn.Linear, *CONVS):
        if isinstance(module, base):
            methods = ("forward", "_conv_forward") if base in CONVS else ("forward",)
            return any(getattr(type(module), m) is not getattr(base, m) for m in methods)
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


def format_table(layers: list[LayerInfo], ranks: dict[str, int] | None = None) -> str:
    """A plain-text table: name, kind, matrix shape, rank / full rank, parameters dense -> stored, note."""
    ranks = ranks or {}
    rows = [("layer", "kind", "shape", "rank", "dense params", "stored params", "note")]
    for info in layers:
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
