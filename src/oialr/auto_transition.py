"""The automatic transition: its settings (:class:`AutoTransition`) and the rule that reads measured network
stability to end the full-rank phase (:class:`PlateauRule`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._checks import Errors, check_same_settings, check_state_version, is_int, is_real

RULE_STATE_VERSION = 1


def _rule_checks(errors: Errors, threshold: Any, window: Any, epsilon: Any, min_steps: Any, max_steps: Any) -> None:
    errors.check(is_real(threshold) and -1.0 < threshold <= 1.0,
                 f"threshold must be a number in (-1, 1] (stability's range), got {threshold!r}")
    errors.check(is_int(window) and window >= 1, f"window must be an integer >= 1 (samples that must agree), "
                                                 f"got {window!r}")
    errors.check(is_real(epsilon) and 0.0 <= epsilon <= 2.0,
                 f"epsilon must be a number in [0, 2] (max − min stability over the window), got {epsilon!r}")
    errors.check(is_int(min_steps) and min_steps >= 0, f"min_steps must be an integer >= 0, got {min_steps!r}")
    if max_steps is not None and not (is_int(max_steps) and max_steps >= 1):
        errors.check(False, f"max_steps must be None or an integer >= 1, got {max_steps!r}")
    elif max_steps is not None and is_int(min_steps):
        errors.check(max_steps >= min_steps, f"max_steps must be None or >= min_steps ({min_steps}), "
                                             f"got {max_steps!r}")


@dataclass
class AutoTransition:
    """Settings of ``OIALRConfig(warmup_steps="auto")``: sample the network's basis stability every ``every``
    optimizer steps and switch to low rank once it has plateaued (:class:`PlateauRule`).

        every: steps between two stability samples of the layers to convert (``>= 1``).
        lag: each sample is compared with the one this many samples earlier (``>= 1``; bases ``lag · every`` steps
            apart; :class:`oialr.StabilityTracker`'s ``lag``).
        threshold, window, epsilon: switch at the first sample where network stability ``>= threshold`` and its
            max − min over the last ``window`` samples ``<= epsilon``...
        min_steps: ...but not before this step...
        max_steps: ...and at this step at the latest (``None``: no limit).
    """

    every: int = 50
    lag: int = 1
    threshold: float = 0.99
    window: int = 4
    epsilon: float = 0.002
    min_steps: int = 200
    max_steps: int | None = None

    def __post_init__(self) -> None:
        errors = Errors()
        errors.check(is_int(self.every) and self.every >= 1, f"every must be an integer >= 1, got {self.every!r}")
        errors.check(is_int(self.lag) and self.lag >= 1, f"lag must be an integer >= 1, got {self.lag!r}")
        _rule_checks(errors, self.threshold, self.window, self.epsilon, self.min_steps, self.max_steps)
        errors.raise_if_any("AutoTransition")


class PlateauRule:
    """Says when to leave full-rank training: once network stability is high and has stopped changing.

    Feed it every stability sample in order (e.g. ``record["network_stability"]`` from
    :class:`oialr.stability.StabilityTracker`); :meth:`update` returns True ("switch now") at the first sample where

        step >= min_steps   and   stability >= threshold   and   max − min of the last ``window`` samples <= epsilon

    (the window includes this sample and must be full), or at the first sample with ``step >= max_steps`` whatever
    the stability. After firing it keeps returning True; :attr:`fired_step` and :attr:`reason` say when and why.
    A None stability (a tracker's first sample) is skipped; a NaN one (non-finite weights) empties the window.

    Defaults, for stability measured every ~50 optimizer steps (to be tuned on real runs). Between samples that
    close, stability is a speed: it is near 1 from the start and follows the learning rate (a width-512 MLP on
    Fashion-MNIST, AdamW 1e-3 with 300 warm-up steps: 0.991 at step 50, 0.991–0.998 while the rate is high, -> 1
    as it decays), so the rule looks for the end of the early transient, not for a climb from 0. On that run these
    defaults fired at step 600, after the learning-rate warm-up; samples further apart give lower stability and
    need a lower ``threshold`` and a larger ``epsilon``.
        threshold=0.99   the mean column cosine of the bases between two samples is at least 0.99
        window=4         the plateau must hold for 4 samples (~200 steps at every=50)
        epsilon=0.002    and vary by at most 0.002 over them
        min_steps=200    never before the optimizer (and a learning-rate warm-up) had a chance to move the weights
        max_steps=None   no forced switch; set it to the hand-set warm-up you would have used (e.g. 1000)
    """

    @classmethod
    def from_settings(cls, auto: AutoTransition) -> PlateauRule:
        """The rule of an :class:`AutoTransition`."""
        return cls(threshold=auto.threshold, window=auto.window, epsilon=auto.epsilon, min_steps=auto.min_steps,
                   max_steps=auto.max_steps)

    def __init__(self, threshold: float = 0.99, window: int = 4, epsilon: float = 0.002, min_steps: int = 200,
                 max_steps: int | None = None) -> None:
        errors = Errors()
        _rule_checks(errors, threshold, window, epsilon, min_steps, max_steps)
        errors.raise_if_any("PlateauRule")
        self.threshold, self.window, self.epsilon = float(threshold), window, float(epsilon)
        self.min_steps, self.max_steps = min_steps, max_steps
        self.history: list[float] = []        # the last `window` stabilities
        self.last_step: int | None = None
        self.fired_step: int | None = None
        self.reason = ""

    @property
    def fired(self) -> bool:
        return self.fired_step is not None

    def update(self, step: int, network_stability: float | None) -> bool:
        """Take the sample at optimizer step ``step``; return whether to switch to low-rank training now."""
        if not is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0 (optimizer steps), got {step!r}")
        if network_stability is not None and not is_real(network_stability, finite=False):
            raise ValueError(f"network_stability must be a number or None, got {network_stability!r}")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"samples must come in increasing step order: got step {step} after step "
                             f"{self.last_step}; feed each sample once (a resumed run continues after the saved step)")
        self.last_step = step
        if self.fired:
            return True
        if network_stability is not None:
            finite = math.isfinite(network_stability)
            self.history = (self.history + [network_stability])[-self.window:] if finite else []
        spread = max(self.history) - min(self.history) if self.history else math.inf
        if (network_stability is not None and step >= self.min_steps and len(self.history) == self.window
                and self.history[-1] >= self.threshold and spread <= self.epsilon):
            return self._fire(step, f"network stability {self.history[-1]:.4f} >= {self.threshold:g} and changed by "
                                    f"{spread:.4f} <= {self.epsilon:g} over the last {self.window} samples at step "
                                    f"{step}")
        if self.max_steps is not None and step >= self.max_steps:
            current = "none yet" if network_stability is None else f"{network_stability:.4f}"
            return self._fire(step, f"max_steps reached: step {step} >= max_steps {self.max_steps} "
                                    f"(network stability {current})")
        return False

    def _fire(self, step: int, reason: str) -> bool:
        self.fired_step, self.reason = step, reason
        return True

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "window": self.window, "epsilon": self.epsilon,
                "min_steps": self.min_steps, "max_steps": self.max_steps}

    def state_dict(self) -> dict[str, Any]:
        """Settings and the samples seen (plain values)."""
        return {"version": RULE_STATE_VERSION, **self.settings(), "history": list(self.history),
                "last_step": self.last_step, "fired_step": self.fired_step, "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved run; the rule must be built with the saved settings."""
        check_state_version("PlateauRule", state, RULE_STATE_VERSION)
        check_same_settings("PlateauRule", state, self.settings())
        self.history, self.last_step = list(state["history"]), state["last_step"]
        self.fired_step, self.reason = state["fired_step"], state["reason"]

