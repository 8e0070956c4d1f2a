"""Checks shared by the validating constructors (bools are not numbers here) and the ``load_state_dict`` methods."""
from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any, finite: bool = True) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and (not finite or math.isfinite(value))


def raise_if_errors(kind: str, errors: list[str], error: type[Exception] = ValueError) -> None:
    """Report every invalid setting of a ``kind`` at once: one line each under ``invalid <kind>:``."""
    if errors:
        raise error(f"invalid {kind}:\n  " + "\n  ".join(errors))


def nested_errors(err: Exception, prefix: str) -> list[str]:
    """The lines of a :func:`raise_if_errors` message, each prefixed (``"auto_"``, ``"oialr."``) for an outer one."""
    return [prefix + line.strip() for line in str(err).splitlines()[1:]]


def check_state_version(kind: str, state: Any, version: int) -> None:
    """Raise ValueError unless ``state`` is a dict saved by ``kind.state_dict()`` at this ``version``."""
    if not isinstance(state, dict) or state.get("version") != version:
        found = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"not a state dict of {kind} version {version} (got a {type(state).__name__} with version "
                         f"{found!r}); pass what {kind}.state_dict() returned")


def check_same_settings(kind: str, saved: dict[str, Any], here: dict[str, Any]) -> None:
    """Raise ValueError listing every setting of ``here`` that differs from the ``saved`` one."""
    diff = [f"{k}: saved {saved[k]!r}, here {v!r}" for k, v in here.items() if saved[k] != v]
    if diff:
        raise ValueError(f"the saved {kind} was built with other settings; build it as in the saved run:\n  "
                         + "\n  ".join(diff))
