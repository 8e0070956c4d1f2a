"""Find the layers OIALR converts, swap them for factored layers, report them, and export them as plain torch
layers (dense, or compact)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import linalg
from .config import OIALRConfig
from .layers import LowRankConv, LowRankLayer, LowRankLinear, LowRankMultiheadAttention

SUPPORTED = "nn.Linear, nn.Conv1d/2d/3d (groups=1) and nn.MultiheadAttention projections"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
        elif _overrides_forward(module):
            info.convert, info.reason = False, f"{type(module).__name__} overrides forward (custom layer)"
        elif isinstance(module, _CONVS) and module.groups != 1:
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
        elif isinstance(module, _CONVS):
            yield name, module, module.weight, "conv"


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _overrides_forward(module: nn.Module) -> bool:
    """True for a subclass of a supported type that computes something else (e.g. timm's weight-standardized
    ``StdConv2d``): replacing it by a plain factored layer would silently change the model."""
    for base in (nn.MultiheadAttention, nn.Linear, *_CONVS):
        if isinstance(module, base):
            methods = ("forward", "_conv_forward") if base in _CONVS else ("forward",)
            return any(getattr(type(module), m) is not getattr(base, m) for m in methods)
    return False


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    """PEFT-style targeting: a string is a full regex match; a list matches exact names or dotted suffixes."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def convert_layer(model: nn.Module, name: str, *, rank: int | None = None,
                  config: OIALRConfig | None = None) -> tuple[nn.Parameter, LowRankLayer]:
    """Replace the layer ``name`` by its factored form and return ``(old dense weight, new layer)``.

    Thin SVD ``W = U diag(s) Vᵀ`` in float32 or better; keeps ``rank`` values if given, else the rank chosen by
    :func:`linalg.select_rank` from ``config`` (at most ``ceil(rank_fraction · min(m, n))``, none ``< cutoff · s_1``).
    The new layer holds ``U[:, :r]``, ``Σ = diag(s[:r])``, ``V[:, :r]`` in the weight's dtype and device and the
    original bias Parameter object. An ``nn.MultiheadAttention`` is first re-expressed, exactly, as a
    :class:`LowRankMultiheadAttention` whose projections are child modules.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child in ("in_proj", "q_proj", "k_proj", "v_proj", "out_proj"):
        parent = LowRankMultiheadAttention.from_torch(parent)
        replace_module(model, parent_name, parent)
    dense = getattr(parent, child)
    weight = dense.weight
    u, s, v = linalg.svd(linalg.matrix_view(weight))
    if rank is None:
        if config is None:
            raise ValueError("convert_layer needs either rank or config")
        max_rank = math.ceil(config.rank_fraction * s.numel())
        rank = linalg.select_rank(s, cutoff=config.cutoff, max_rank=max_rank, min_rank=config.min_rank)
    if not 1 <= rank <= s.numel():
        raise ValueError(f"rank for {name!r} must be in [1, {s.numel()}], got {rank}")
    factors = [t.to(weight.dtype).contiguous() for t in (u[:, :rank], torch.diag(s[:rank]), v[:, :rank])]
    if isinstance(dense, nn.Linear):
        layer: LowRankLayer = LowRankLinear(*factors, bias=dense.bias)
    else:
        layer = LowRankConv(*factors, bias=dense.bias, conv=dense)
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
    the model no longer needs oialr to run or load.
    """
    return _replace_lowrank(model, lambda layer: layer.to_compact())


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


def format_table(layers: list[LayerInfo], ranks: dict[str, int] | None = None) -> str:
    """A plain-text table: name, kind, matrix shape, rank / full rank, parameters dense -> stored, note."""
    ranks = ranks or {}
    rows = [("layer", "kind", "shape", "rank", "dense params", "stored params", "note")]
    for info in layers:
        m, n = info.shape
        full = min(m, n)
        r = ranks.get(info.name)
        stored = info.dense_params if r is None else r * (m + n + r)
        rank = f"{r}/{full}" if r is not None else f"{full}/{full}"
        note = info.reason if not info.convert else ("factored" if r is not None else "to convert")
        rows.append((info.name, info.kind, f"{m}x{n}", rank, f"{info.dense_params:,}", f"{stored:,}", note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
