"""A model's OIALR structure as plain data (which layers are factored or compact, their kind, shape and rank), and
giving a freshly built dense model that structure — placeholders of the saved ranks, no SVD — for
:func:`oialr.from_pretrained`."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .convert import COMPACT_MARK, compact_layer, replace_module
from .factorize import Factors
from .layer_types import layer_type
from .layers import LowRankLayer, LowRankMultiheadAttention
from .targets import MHA_PROJECTIONS, as_matrix, weight_layers

FACTORED, COMPACT = "factored", "compact"


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per factored layer and per compact export (:func:`oialr.compact_lowrank`'s two-layer
    ``nn.Sequential``), in registration order: ``{"name", "form": "factored" | "compact", "kind", "matrix_shape":
    [m, n], "rank"}``; ``kind`` is the layer type's (``"attention"`` for a projection of an attention module)."""
    entries = []
    for name, module in model.named_modules():
        mark = getattr(module, COMPACT_MARK, None)
        if isinstance(module, nn.Sequential) and isinstance(mark, dict):
            entries.append({"name": name, "form": COMPACT, **mark})
    for name, module, _, kind in weight_layers(model):
        if isinstance(module, LowRankLayer):
            entries.append({"name": name, "form": FACTORED, "kind": kind, "matrix_shape": list(module.matrix_shape),
                            "rank": module.rank})
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(entries, key=lambda entry: order[entry["name"]])


def plan(model: nn.Module, entries: list[dict[str, Any]]) -> dict[str, nn.Module]:
    """``path -> new module`` giving the dense ``model`` the structure ``entries`` (of :func:`describe`), built
    without changing ``model``: placeholder factors (zeros) of the saved ranks. ``ValueError`` naming the first
    entry whose layer the model lacks or holds with another kind or matrix shape."""
    found = {name: (module, weight, kind) for name, module, weight, kind in weight_layers(model)}
    built: dict[str, nn.Module] = {}
    for entry in entries:
        name, kind, (m, n), r = entry["name"], entry["kind"], entry["matrix_shape"], entry["rank"]
        saved = f"saved as a {entry['form']} {kind} layer {m}x{n} of rank {r}"
        try:
            builder = layer_type("linear" if kind == "attention" else kind)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {saved}, but {err}") from None
        if name not in found:
            raise ValueError(f"layer {name!r}: {saved}, but the model has no {kind} layer of that name "
                             f"(found {_what_is_at(model, name)}); build the model with the saved architecture")
        module, weight, found_kind = found[name]
        if isinstance(module, (LowRankLayer, LowRankMultiheadAttention)):
            raise ValueError(f"layer {name!r}: {saved}, but the model's layer is already factored; "
                             "from_pretrained takes a freshly built dense model")
        shape = tuple(as_matrix(module, weight).shape)
        if found_kind != kind or shape != (m, n):
            raise ValueError(f"layer {name!r}: {saved}, but the model holds a {found_kind} layer {shape[0]}x"
                             f"{shape[1]}; build the model with the saved architecture")
        if not 1 <= r <= min(m, n):
            raise ValueError(f"layer {name!r}: saved rank {r} is impossible for a {entry['form']} {m}x{n} layer")
        factors = Factors(weight.new_zeros(m, r), weight.new_zeros(r, r), weight.new_zeros(n, r))
        parent_name, _, child = name.rpartition(".")
        if kind == "attention" and child in MHA_PROJECTIONS and isinstance(module, nn.MultiheadAttention):
            if entry["form"] != FACTORED:
                raise ValueError(f"layer {name!r}: an attention projection cannot be saved in compact form")
            attention = built.setdefault(parent_name, LowRankMultiheadAttention.from_torch(module))
            setattr(attention, child, builder.build(getattr(attention, child), factors))
            continue
        layer = builder.build(module, factors)
        built[name] = layer if entry["form"] == FACTORED else compact_layer(layer, two_layers=True)
    return built


def expected_state(model: nn.Module, built: dict[str, nn.Module]) -> dict[str, Tensor]:
    """The state dict ``model`` will have once the modules ``built`` replace theirs (at every path a replaced
    module is registered), computed without changing ``model``."""
    paths = {}
    for name, new in built.items():
        old = model.get_submodule(name)
        paths.update({path: new for path, module in model.named_modules(remove_duplicate=False) if module is old})
    state = {key: value for key, value in model.state_dict(keep_vars=True).items()
             if not any(key.startswith(path + ".") for path in paths)}
    for path, new in paths.items():
        state.update(new.state_dict(prefix=path + ".", keep_vars=True))
    return state


def apply(model: nn.Module, built: dict[str, nn.Module]) -> None:
    """Swap the planned modules in (:func:`plan`)."""
    for name, new in built.items():
        replace_module(model, name, new)


def _what_is_at(model: nn.Module, name: str) -> str:
    try:
        return f"a {type(model.get_submodule(name)).__name__}"
    except AttributeError:
        return "nothing"


@torch.no_grad()
def check_state(expected: dict[str, Tensor], saved: dict[str, tuple[list[int], torch.dtype]], where: str) -> None:
    """``ValueError`` naming the first key (and its layer) whose presence, shape or dtype differ between the state
    the model will have (``expected``) and the saved one (``saved``: key -> (shape, dtype))."""
    for key, tensor in expected.items():
        layer, shown = key.rpartition(".")[0] or "(the model)", _show(list(tensor.shape), tensor.dtype)
        if key not in saved:
            raise ValueError(f"{where}: layer {layer!r}: the model has {key!r} ({shown}), the file does not; build "
                             "the model with the saved architecture")
        if (list(tensor.shape), tensor.dtype) != (list(saved[key][0]), saved[key][1]):
            raise ValueError(f"{where}: layer {layer!r}: {key!r} is {shown} in the "
                             f"model, {_show(*saved[key])} in the file; build the model with the saved architecture "
                             "and dtype")
    for key, (shape, dtype) in saved.items():
        if key not in expected:
            raise ValueError(f"{where}: layer {key.rpartition('.')[0] or '(the model)'!r}: the file has {key!r} "
                             f"({_show(shape, dtype)}), the model does not; build the model with the saved "
                             "architecture")


def _show(shape: list[int], dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')} {tuple(shape)}"
