"""Save a model with its OIALR structure and load it into a freshly built dense model, PEFT-style, without pickle:
``model.safetensors`` (the state dict) and ``oialr_config.json`` (the structure, the aliases, the config)."""
from __future__ import annotations

import json
import os
from typing import Any

from torch import Tensor, nn

from . import files, safetensors_file, structure
from .config import OIALRConfig

WEIGHTS, CONFIG = "model.safetensors", "oialr_config.json"
FORMAT, VERSION = "oialr-pretrained", 1


def save_pretrained(model: nn.Module, directory: str, config: OIALRConfig | None = None) -> None:
    """Write ``directory/model.safetensors`` and ``directory/oialr_config.json``, each atomically.

    The weights file holds every tensor of ``model.state_dict()``; a tensor registered under several keys (tied
    weights, shared modules) is stored once and the json lists the other keys as ``aliases``. The json holds
    ``format``, ``version``, ``layers`` (every factored layer and compact export: name, form, kind, matrix shape,
    rank; :func:`oialr.structure.describe`) and ``config`` (``config.to_dict()``, or null).
    A model merged to dense (:func:`oialr.merge_lowrank`) is a plain model: save it as you would without oialr.
    """
    if config is not None and not isinstance(config, OIALRConfig):
        raise TypeError(f"config must be an OIALRConfig or None, got {type(config).__name__}")
    tensors, aliases = _unique(model.state_dict())
    safetensors_file.save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    files.write_json(os.path.join(directory, CONFIG), {
        "format": FORMAT, "version": VERSION, "layers": structure.describe(model), "aliases": aliases,
        "config": None if config is None else config.to_dict(),
    })


def from_pretrained(model: nn.Module, directory: str) -> nn.Module:
    """Give ``model`` (freshly built, dense, the saved architecture) the saved structure and load the saved weights
    exactly; returns ``model``. No optimizer, no controller, no pickle.

    Factored layers and compact exports are rebuilt at the saved ranks from placeholders (no SVD), then every key
    of the state dict must match the file in name, shape and dtype. Everything is checked before ``model`` is
    changed: on a mismatch a ``ValueError`` names the first mismatching layer, expected vs found, and ``model`` is
    left as it was.
    """
    info = read_config(directory)
    weights = os.path.join(directory, WEIGHTS)
    entries, _, _ = safetensors_file.read_header(weights)
    saved = {key: (entry["shape"], safetensors_file.DTYPES[entry["dtype"]]) for key, entry in entries.items()}
    for key, target in info["aliases"].items():
        if target not in saved:
            raise ValueError(f"{directory}/{CONFIG}: alias {key!r} points to {target!r}, which {WEIGHTS} lacks")
        saved[key] = saved[target]
    built = structure.plan(model, info["layers"])
    structure.check_state(structure.expected_state(model, built), saved, weights)
    state = safetensors_file.load_file(weights)
    state.update({key: state[target] for key, target in info["aliases"].items()})
    structure.apply(model, built)
    model.load_state_dict(state, strict=True)
    return model


def read_config(directory: str) -> dict[str, Any]:
    """The contents of ``directory/oialr_config.json``, checked for format and version."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: from_pretrained reads a folder written by oialr.save_pretrained")
    with open(path) as f:
        info = json.load(f)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path} is not an oialr save_pretrained config (format {FORMAT!r})")
    if info.get("version") != VERSION:
        raise ValueError(f"{path} has format version {info.get('version')}; this oialr reads version {VERSION}")
    return info


def _unique(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, aliases)``: each tensor once under its first key; every later key holding the very same tensor
    (same memory, dtype, shape and strides) maps to that first key."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, tensor in state.items():
        identity = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and identity in first:
            aliases[key] = first[identity]
        else:
            first.setdefault(identity, key)
            tensors[key] = tensor
    return tensors, aliases


