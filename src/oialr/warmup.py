"""When OIALR's full-rank phase ends: after ``warmup_steps`` optimizer steps, or once measured basis stability has
plateaued (``warmup_steps="auto"``)."""
from __future__ import annotations

from typing import Any

from torch import nn

from . import distributed
from ._checks import warn
from .auto_transition import PlateauRule
from .config import OIALRConfig
from .stability import StabilityTracker
from .stability_metrics import network_stability


class WarmupEnd:
    """Decides, step by step, whether the full-rank phase is over.

    Fixed warm-up: over at step ``T₀ = steps`` (``config.warmup_steps``, or that fraction of a run of
    ``total_steps``: :meth:`oialr.OIALRConfig.warmup_for`). ``"auto"``: at every ``config.auto.every``-th step the
    network stability of the layers to convert (``targets``) is sampled, by ``tracker`` (one the caller already
    steps for the whole run, sampling at ``config.auto``'s ``every`` and ``lag``) or by one built here, and fed to a
    :class:`oialr.PlateauRule`; process 0 decides and every process ends the warm-up at the same step.
    """

    def __init__(self, model: nn.Module, config: OIALRConfig, targets: list[str],
                 tracker: StabilityTracker | None = None, total_steps: int | None = None):
        self.config, self.total_steps = config, total_steps
        self.steps = config.warmup_for(total_steps)         # steps, or "auto"
        self.tracker: StabilityTracker | None = None
        self.rule: PlateauRule | None = None
        self._own_tracker = tracker is None
        if self.steps != "auto":
            if tracker is not None:
                raise ValueError("tracker is read only with warmup_steps=\"auto\"; leave it out")
            return
        auto = config.auto
        self.rule = PlateauRule.from_settings(auto)
        if tracker is None:
            self.tracker = StabilityTracker(model, every=auto.every, cutoff=config.cutoff, layers=targets,
                                            lag=auto.lag)
            return
        missing = [name for name in targets if name not in tracker.layers]
        if (tracker.every, tracker.lag) != (auto.every, auto.lag) or missing:
            raise ValueError(f"the tracker given must sample every {auto.every} steps at lag {auto.lag} (config.auto)"
                             f" and measure every layer to convert; it samples every {tracker.every} at lag "
                             f"{tracker.lag} and misses {missing}")
        self.tracker = tracker

    def reason(self, step: int, targets: list[str]) -> str | None:
        """Why the full-rank phase ends at optimizer step ``step`` (called once per step, in order), or None; at
        step ``total_steps`` (when known) still in the warm-up, one warning."""
        why = self._reason(step, targets)
        if why is None and step == self.total_steps:
            warn(f"OIALR: the run ends (step {step} of total_steps={self.total_steps}) still in the full-rank warm-up "
                 f"(warmup_steps={self.config.warmup_steps!r}): no layer was converted; give a smaller warmup_steps, "
                 "e.g. a fraction of the run such as 0.2")
        return why

    def _reason(self, step: int, targets: list[str]) -> str | None:
        if self.rule is None:
            return f"warmup_steps={self.steps} reached" if step >= self.steps else None
        if self._own_tracker:
            record = self.tracker.step()
        else:                                   # the caller stepped its tracker first: read this step's sample
            records = self.tracker.records
            record = records[-1] if records and records[-1]["step"] == step else None
        if record is None:
            return None
        fired = self.rule.update(step, network_stability(record["layers"], targets))
        return distributed.broadcast_object(self.rule.reason if fired else None)

    def finish(self) -> None:
        """The warm-up is over: no more samples are taken or read."""
        self.tracker = None

    def state_dict(self) -> dict[str, Any]:
        """The rule's samples and, when this object owns the tracker, the tracker's (plain values)."""
        return {"tracker": self.tracker.state_dict() if self.tracker is not None and self._own_tracker else None,
                "rule": None if self.rule is None else self.rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["rule"] is None) != (self.rule is None):
            raise ValueError("the saved run and this controller disagree on warmup_steps='auto'; build the "
                             "OIALRConfig as in the saved run")
        if self.rule is not None:
            self.rule.load_state_dict(state["rule"])
        if self.tracker is not None and self._own_tracker and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])
