"""Which layers a peer method treats (OIALR's eligible ``nn.Linear`` layers) and the rank each gets: a fraction of
its full rank, a number, or the final ranks of a finished OIALR run."""
from __future__ import annotations

import json
import math
from typing import Any

from torch import nn

from .. import OIALRConfig, find_layers


def linear_layers(model: nn.Module, config: OIALRConfig) -> dict[str, tuple[int, int]]:
    """``name -> (m, n)`` of the layers :func:`oialr.find_layers` converts under ``config``'s targeting rules, in
    registration order; each must be a plain ``nn.Linear`` (``ValueError`` otherwise, or when there is none)."""
    layers = {}
    for info in find_layers(model, config):
        if not info.convert:
            continue
        try:
            module = model.get_submodule(info.name)
        except AttributeError:                     # an nn.MultiheadAttention projection, not a module of its own
            module = None
        if type(module) is not nn.Linear:
            raise ValueError(f"layer {info.name!r} is no plain nn.Linear ({type(module).__name__}); the peer methods "
                             "treat nn.Linear layers only (exclude it with oialr.exclude_modules)")
        layers[info.name] = info.shape
    if not layers:
        raise ValueError("no layer of the model is eligible (see oialr.find_layers); nothing to factor or project")
    return layers


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rank_spec(spec: Any) -> str | None:
    """The problem with a rank setting, or None: a number in ``(0, 1]``, an integer ``>= 1`` or a path."""
    if isinstance(spec, str) and spec:
        return None
    if is_int(spec) and spec >= 1:
        return None
    if is_real(spec) and not is_int(spec) and 0.0 < spec <= 1.0:
        return None
    return (f"rank must be a fraction of each layer's full rank in (0, 1] (e.g. 0.25), an integer >= 1 (capped at "
            f"each layer's full rank) or the path of a finished OIALR run's results.json, got {spec!r}")


def resolve_ranks(spec: float | int | str, layers: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The rank of every layer ``name -> (m, n)``, from ``spec``:

    - a float ``f`` in ``(0, 1]``: ``ceil(f · min(m, n))``;
    - an integer ``r >= 1``: ``min(r, min(m, n))``;
    - a string: the path of a ``results.json`` written by ``oialr train`` (an OIALR run of the same model); each
      layer takes its final rank from the file's ``layers``, and every layer here must be there.

    Raises ``ValueError`` naming the problem (bad spec, unreadable file, layers missing from it).
    """
    problem = check_rank_spec(spec)
    if problem:
        raise ValueError(problem)
    if isinstance(spec, str):
        return _ranks_from_results(spec, layers)
    if is_int(spec):
        return {name: min(spec, m, n) for name, (m, n) in layers.items()}
    return {name: max(1, math.ceil(spec * min(m, n))) for name, (m, n) in layers.items()}


def _ranks_from_results(path: str, layers: dict[str, tuple[int, int]]) -> dict[str, int]:
    try:
        with open(path) as f:
            saved = json.load(f)["layers"]
    except OSError as err:
        raise ValueError(f"rank: cannot read {path} ({err.strerror}); give the results.json of a finished "
                         "OIALR run") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"rank: {path} is not a results.json of oialr train ({err!r})") from None
    missing = sorted(name for name in layers if name not in saved)
    if missing:
        raise ValueError(f"rank: {path} has no rank for {len(missing)} layer(s) of this model ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); use the results of an OIALR run of the same model")
    ranks = {}
    for name, (m, n) in layers.items():
        r = saved[name].get("rank") if isinstance(saved[name], dict) else None
        if not is_int(r) or not 1 <= r <= min(m, n):
            raise ValueError(f"rank: {path} gives layer {name!r} ({m}x{n}) rank {r!r}, expected an integer in "
                             f"[1, {min(m, n)}]")
        ranks[name] = r
    return ranks
