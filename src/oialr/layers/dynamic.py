"""Keep a ``torch.compile``'d model compiled across rank changes: the rank dimensions of ``U``, ``Σ``, ``V`` are
traced as dynamic sizes."""
from __future__ import annotations

import torch.compiler.config

# torch.compiler.config.dynamic_sources entries (a regex matched against dynamo's name of a tensor; ":N" = only
# dimension N): the columns of U (m×r) and V (n×r) and both dimensions of Σ (r×r), in every factored layer
RANK_DIMS = (r".*\['lowrank_U'\]:1", r".*\['lowrank_V'\]:1", r".*\['lowrank_S'\]")


def dynamic_ranks() -> None:
    """Add :data:`RANK_DIMS` to ``torch.compiler.config.dynamic_sources``, keeping its other entries (idempotent;
    called by every factored layer). Without them dynamo specialises every Parameter's shape
    (``force_parameter_static_shapes``), recompiles at each rank change and after ``recompile_limit`` (8) changes
    runs the model eagerly (or fails, under ``fullgraph=True``). With them one graph serves every rank, apart from
    a recompile when a layer's cheapest forward path (:func:`oialr.layers.forward_path`) changes or a rank
    reaches 1. The entries match only tensors named ``lowrank_U``/``lowrank_S``/``lowrank_V``."""
    current = [entry for entry in torch.compiler.config.dynamic_sources.split(",") if entry.strip()]
    missing = [entry for entry in RANK_DIMS if entry not in current]
    if missing:
        torch.compiler.config.dynamic_sources = ",".join(current + missing)
