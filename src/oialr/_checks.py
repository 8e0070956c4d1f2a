"""Checks shared by the validating constructors (bools are not numbers here) and the ``load_state_dict`` methods, and
warnings that point at the caller."""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any

import torch


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any, finite: bool = True) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and (not finite or math.isfinite(value))


class Errors:
    """Collects the problems of a set of settings, so that all are reported at once."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.messages.append(message)

    def nested(self, err: Exception, prefix: str) -> None:
        """Add the problems of an inner set of settings (an error raised by :meth:`raise_if_any`), each named with
        ``prefix`` (``"auto."``, ``"oialr."``)."""
        self.messages.extend(prefix + line for line in getattr(err, "problems", [str(err)]))

    def raise_if_any(self, kind: str, error: type[Exception] = ValueError) -> None:
        """Raise ``error`` with one line per problem under ``invalid <kind>:``; the list is its ``problems``."""
        if self.messages:
            exc = error(f"invalid {kind}:\n  " + "\n  ".join(self.messages))
            exc.problems = list(self.messages)
            raise exc


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


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def warn(message: str) -> None:
    """``warnings.warn(message)`` pointing at the caller's line: the first frame outside oialr and torch (whose
    ``no_grad`` wrappers sit between a user's call and the code that warns), whatever the call depth."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
