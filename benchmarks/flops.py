"""Multiply-add model of a training step: per converted layer the library's path (chain, merged or dense rebuild) and
its cost, and the whole-model prediction."""
from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
from torch import nn

import oialr
from oialr.layers import PATHS, forward_path


def rebuild_macs(m: int, n: int, r: int) -> int:
    """Multiply-adds of ``W = U Σ Vᵀ`` in the order :meth:`oialr.LowRankLayer.dense_matrix` uses."""
    return m * n * r + min(m, n) * r * r


def training_macs(tokens: int, m: int, n: int, r: int, path: str) -> int:
    """Forward + backward multiply-adds of one layer, ``W (m×n)`` applied to ``T`` rows (tokens, or batch × output
    positions of a conv) at rank ``r``, on ``path``: ``"full"`` (a dense layer) or one of ``oialr.layers.PATHS``::

        full      fwd T·m·n                       bwd dX, dW: 2·T·m·n
        chain     fwd h = xV, h Σᵀ, h Uᵀ:         bwd dh = dy U (T·m·r), dΣ and dh Σ (2·T·r²), dX (T·r·n)
                      T·r·(n + r + m)
        merged    fwd x (ΣVᵀ)ᵀ, h Uᵀ:             bwd dh = dy U (T·m·r), dX and d(ΣVᵀ) (2·T·n·r), dΣ (n·r²)
                      T·r·(n + m) + n·r²
        dense     fwd T·m·n + R                   bwd 2·T·m·n + R, with R = rebuild_macs(m, n, r)

    No ``dU`` or ``dV``: ``U`` and ``V`` are frozen. ``dX`` of the first layer is counted although autograd skips it.
    These are the costs :func:`oialr.layers.forward_path` compares; they are written out here on their own.
    """
    if path == "full":
        return 3 * tokens * m * n
    if path == "chain":
        return tokens * r * (2 * m + 2 * n + 3 * r)
    if path == "merged":
        return tokens * r * (2 * m + 3 * n) + 2 * n * r * r
    if path == "dense":
        return 3 * tokens * m * n + 2 * rebuild_macs(m, n, r)
    raise ValueError(f"unknown path {path!r}")


def choose_path(config_path: str | None, tokens: int, m: int, n: int, r: int) -> str:
    """The path a factored layer takes under a config (``workloads.Config.path``: ``None`` = the library's choice,
    else the forced path)."""
    return forward_path(tokens, m, n, r) if config_path is None else config_path


def trace_tokens(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], int]:
    """Rows ``T`` each Linear/Conv layer of the dense ``model`` is applied to, by name, and the forward multiply-adds
    of attention products (modules named ``Attention`` taking ``(B, N, C)``), from one forward pass on ``x``."""
    tokens: dict[str, int] = {}
    attention = [0]

    def layer_hook(name):
        def hook(module, inputs, output):
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            tokens[name] = output.numel() // channels
        return hook

    def attention_hook(module, inputs, output):
        b, n, c = inputs[0].shape
        attention[0] += 2 * b * n * n * c

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(module.register_forward_hook(layer_hook(name)))
        elif type(module).__name__ == "Attention":
            handles.append(module.register_forward_hook(attention_hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return tokens, attention[0]


class FlopModel:
    """Layer shapes and token counts of one workload, and the multiply-adds of a training step per config.

    A step is the sum of :func:`training_macs` over the Linear/Conv layers plus 3 × the attention products
    (``q kᵀ`` and ``A v``: ``2·B·N²·C`` forward); norms, activations, softmax and the optimizer are not counted.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.tokens, self.attention_macs = trace_tokens(model, x)
        self.layers = [info for info in oialr.find_layers(model, oialr.OIALRConfig(warmup_steps=0))
                       if info.shape is not None]                   # weight matrices, not the "other" rows

    def step_macs(self, config) -> int:
        """Predicted multiply-adds of a training step (forward + backward) of the whole model under ``config``
        (a ``workloads.Config``)."""
        if config.rank_fraction is None:
            return self.macs_at({})
        ranks = {info.name: math.ceil(config.rank_fraction * min(info.shape)) for info in self.layers if info.convert}
        return self.macs_at(ranks, config.path)

    def macs_at(self, ranks: dict[str, int], path: str | None = None) -> int:
        """Multiply-adds of a training step with the layers named in ``ranks`` factored at those ranks (on ``path``,
        ``None`` = the library's choice) and every other layer dense."""
        unknown = sorted(set(ranks) - set(self.tokens))
        if unknown:
            raise KeyError(f"ranks name layers this model does not have: {unknown}")
        total = 3 * self.attention_macs
        for info in self.layers:
            m, n = info.shape
            t = self.tokens[info.name]
            if info.name not in ranks:
                total += training_macs(t, m, n, min(m, n), "full")
                continue
            r = ranks[info.name]
            total += training_macs(t, m, n, r, choose_path(path, t, m, n, r))
        return total

    def layer_costs(self, fractions: list[float]) -> list[dict]:
        """Per converted layer (identical layers of repeated blocks grouped as ``blocks.*.attn.qkv ×6``): ``label``,
        ``shape (m, n)``, ``tokens`` ``T``, forward + backward multiply-adds of the full-rank layer (``full_macs``) and
        per rank fraction (``fractions[f]``): the rank, the path the library chooses, that path's multiply-adds as a
        fraction of the full-rank layer's (``cost``) and the path with the fewest multiply-adds by this model
        (``cheapest``; ``None`` when it costs what the library's path costs)."""
        groups: dict[tuple, list[str]] = defaultdict(list)
        for info in self.layers:
            if info.convert:
                pattern = re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", info.name)
                groups[(pattern, *info.shape, self.tokens[info.name])].append(info.name)
        layers = []
        for (pattern, m, n, t), names in groups.items():
            full = training_macs(t, m, n, min(m, n), "full")
            per_fraction = {}
            for f in fractions:
                r = math.ceil(f * min(m, n))
                path = forward_path(t, m, n, r)
                cheapest = min(PATHS, key=lambda p: training_macs(t, m, n, r, p))
                same = training_macs(t, m, n, r, cheapest) == training_macs(t, m, n, r, path)
                per_fraction[f] = {"rank": r, "path": path, "cost": training_macs(t, m, n, r, path) / full,
                                   "cheapest": None if same else cheapest}
            layers.append({"label": f"{pattern} ×{len(names)}" if len(names) > 1 else names[0], "shape": (m, n),
                           "tokens": t, "full_macs": full, "fractions": per_fraction})
        return layers


def layer_rows(layers: list[dict]) -> list[list]:
    """Table rows of :meth:`FlopModel.layer_costs`: label, ``m×n``, ``T``, full-rank MMAC, then per fraction
    ``"r: path cost"`` (and ``(model: cheapest)`` where this model prefers another path)."""
    rows = []
    for layer in layers:
        m, n = layer["shape"]
        row = [layer["label"], f"{m}×{n}", layer["tokens"], f"{layer['full_macs'] / 1e6:.0f}"]
        for c in layer["fractions"].values():
            disagree = "" if c["cheapest"] is None else f" (model: {c['cheapest']})"
            row.append(f"{c['rank']}: {c['path']} {c['cost']:.2f}{disagree}")
        rows.append(row)
    return rows
