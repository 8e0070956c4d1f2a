"""OIALRConfig: every knob of OIALR training, documented and validated."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ._checks import Errors, is_int, is_real
from .auto_transition import AutoTransition

# names the settings of the automatic transition had before they moved into OIALRConfig.auto (results files of
# older runs still hold them); OIALRConfig.from_dict reads them
_LEGACY_AUTO = {"stability_every": "every", "stability_lag": "lag", "auto_threshold": "threshold",
                "auto_window": "window", "auto_epsilon": "epsilon", "auto_min_steps": "min_steps",
                "auto_max_steps": "max_steps"}


@dataclass
class OIALRConfig:
    """Hyperparameters of Orthogonality-Informed Adaptive Low-Rank training.

    All step counts are optimizer steps (calls of :meth:`oialr.OIALR.step`), never forward passes.

    Schedule
        warmup_steps: full-rank steps before the transition. The transition runs inside the
            ``warmup_steps``-th call of ``step()``; ``0`` converts when the controller is built. A float in
            ``(0, 1)`` is a fraction of the run: ``round(warmup_steps · total_steps)`` steps (at least 1), for a
            controller given ``total_steps``. ``"auto"``: measure
            the network's basis stability every ``stability_every`` steps and switch once it has plateaued
            (:class:`oialr.PlateauRule` with the ``auto_*`` knobs below).
        update_every: steps between two basis updates after the transition (``>= 1``).

    Automatic transition (``warmup_steps="auto"`` only)
        stability_every: steps between two stability samples of the layers to convert (``>= 1``).
        stability_lag: each sample is compared with the one this many samples earlier (``>= 1``; bases
            ``stability_lag · stability_every`` steps apart; :class:`oialr.StabilityTracker`'s ``lag``).
        auto_threshold, auto_window, auto_epsilon: switch at the first sample where network stability
            ``>= auto_threshold`` and its max − min over the last ``auto_window`` samples ``<= auto_epsilon``...
        auto_min_steps: ...but not before this step...
        auto_max_steps: ...and at this step at the latest (``None``: no limit).

    Rank selection (at the transition and at every basis update, on singular values ``s_1 >= s_2 >= ...``)
        cutoff: drop every ``s_i < cutoff * s_1``; in ``[0, 1)``.
        rank_fraction: at the transition keep at most ``ceil(rank_fraction * min(m, n))`` values; in ``(0, 1]``.
        min_rank: never cut a layer below this rank (``>= 1``; capped at the layer's full rank).
        max_drop_fraction: remove at most ``floor(max_drop_fraction * r)`` of a layer's ``r`` values per basis update;
            ``0.5`` is the paper's "at most half per update"; ``1.0`` (default) removes everything under the cutoff;
            ``0`` cuts only at the transition (the ranks stay fixed after it; basis updates only rotate).
        stored_budget: if set, a fraction in ``(0, 1]``: the factored layers together store at most this fraction of
            the dense parameters they replace (``U``, ``Σ``, ``V`` counted: ``r(m + n + r)`` per layer). The ranks are
            allocated across layers (:func:`oialr.budget.allocate_ranks`, from each weight's singular components
            weighed by their share of the layer's output in the training forward of the step the allocation runs
            in, :mod:`oialr.output_sample`)
            at the transition and at every basis update (without ``augment_bases`` the ranks stay within the
            transition's allocation, and an update's allocation is every layer's own cut); the budget caps what the
            rules above keep (``cutoff``, ``rank_fraction``, ``min_rank``, and ``max_drop_fraction``, which can slow
            how fast it is reached): ``cutoff=0`` lets the budget alone decide. A budget below every layer at
            ``min_rank`` is an error when the controller is built. At ``warmup_steps=0`` no forward has run yet and
            the allocation reads the random init's singular values alone (on the byte-level Llama of
            docs/RESULTS.md the rule of 2026-12-02 gave attention 70 and the MLP 104 of 384 at a budget of 0.396,
            and ended 1.1% behind rank 96 for all, which stores 0.432); there ``rank_fraction`` (with ``cutoff=0``)
            is the better start.

    Beyond the paper
        augment_bases: at every basis update, after the cut, widen each layer's ``U``, ``V`` with up to ``r`` new
            directions of the loss gradient they miss (recorded in the backward pass of the step before the
            update; :mod:`oialr.growth`), with zeros in ``Σ`` for them: a layer can gain rank where training needs
            it. Between updates a layer holds up to twice its cut rank (the budget applies to the cut ranks).
        train_bases: ``U`` and ``V`` train too, in ``Σ``'s param group (they replace the same weight), with their
            own optimizer state carried through the basis updates, which re-orthonormalise them.

    Which layers (``nn.Linear``, ``nn.Conv1d/2d/3d`` with ``groups=1``, ``nn.MultiheadAttention`` projections)
        target_modules: ``None`` = every eligible layer; a list of names = layers whose qualified name equals an entry
            or ends with ``"." + entry``; a string = a regular expression that must match the whole qualified name.
            Attention projections are named ``<mha>.in_proj`` (or ``<mha>.q_proj``/``k_proj``/``v_proj``) and
            ``<mha>.out_proj``.
        exclude_modules: same forms as ``target_modules``; matching layers stay dense.
        keep_output_layer_dense: keep the output layer dense (the rule "output layer": the last eligible layer in the
            model's registration order, which is the classifier head of timm and torchvision models and of
            ``nn.Sequential`` stacks). Set ``False`` to convert it too.
        max_aspect_ratio: if set, a layer with ``max(m, n) / min(m, n) >= max_aspect_ratio`` stays dense (the paper
            used 10). ``None`` (default) converts every shape.
    """

    warmup_steps: int | float | str = 1000
    update_every: int = 100
    cutoff: float = 0.1
    rank_fraction: float = 1.0
    min_rank: int = 1
    max_drop_fraction: float = 1.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = field(default_factory=list)
    keep_output_layer_dense: bool = True
    max_aspect_ratio: float | None = None
    stored_budget: float | None = None
    augment_bases: bool = False
    train_bases: bool = False
    auto: AutoTransition = field(default_factory=AutoTransition)

    def __post_init__(self) -> None:
        errors = Errors()
        check = errors.check
        if isinstance(self.auto, dict):
            try:
                self.auto = AutoTransition(**self.auto)
            except ValueError as err:
                errors.nested(err, "auto.")
            except TypeError:
                known = ", ".join(f.name for f in fields(AutoTransition))
                check(False, f"auto takes the fields {known}; got {sorted(self.auto)}")
        elif not isinstance(self.auto, AutoTransition):
            check(False, f"auto must be an AutoTransition or a mapping of its fields, got {self.auto!r}")
        check((is_int(self.warmup_steps) and self.warmup_steps >= 0) or self.warmup_steps == "auto"
              or (isinstance(self.warmup_steps, float) and 0.0 < self.warmup_steps < 1.0),
              f"warmup_steps must be an integer >= 0 (0 converts at construction), a fraction of the run in (0, 1) "
              f"or \"auto\", got {self.warmup_steps!r}")
        check(is_int(self.update_every) and self.update_every >= 1,
              f"update_every must be an integer >= 1, got {self.update_every!r}")
        check(is_real(self.cutoff) and 0.0 <= self.cutoff < 1.0,
              f"cutoff must be a number in [0, 1), got {self.cutoff!r}")
        check(is_real(self.rank_fraction) and 0.0 < self.rank_fraction <= 1.0,
              f"rank_fraction must be a number in (0, 1], got {self.rank_fraction!r}")
        check(is_int(self.min_rank) and self.min_rank >= 1,
              f"min_rank must be an integer >= 1, got {self.min_rank!r}")
        check(is_real(self.max_drop_fraction) and 0.0 <= self.max_drop_fraction <= 1.0,
              f"max_drop_fraction must be a number in [0, 1] (0.5 = the paper's 'at most half', 0 = no cut after "
              f"the transition), got {self.max_drop_fraction!r}")
        check(self.stored_budget is None or (is_real(self.stored_budget) and 0.0 < self.stored_budget <= 1.0),
              f"stored_budget must be None or a fraction in (0, 1] of the dense parameters (0.25 = a quarter), "
              f"got {self.stored_budget!r}")
        for name in ("augment_bases", "train_bases"):
            check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        check(not (self.augment_bases is True and self.max_drop_fraction == 0),
              "augment_bases=True widens the bases at every update and only the cut narrows them again, but "
              "max_drop_fraction=0 never cuts after the transition; raise max_drop_fraction or drop augment_bases")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            ok = value is None or isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) and v for v in value))
            check(ok, f"{name} must be None, a regular expression string or a list of non-empty module names, "
                      f"got {value!r}")
            check(not isinstance(value, str) or _regex_problem(value) is None,
                  f"{name} is not a valid regular expression ({_regex_problem(value)}): {value!r}")
        check(isinstance(self.keep_output_layer_dense, bool),
              f"keep_output_layer_dense must be True or False, got {self.keep_output_layer_dense!r}")
        check(self.max_aspect_ratio is None or (is_real(self.max_aspect_ratio) and self.max_aspect_ratio >= 1.0),
              f"max_aspect_ratio must be None or a number >= 1 (the paper used 10), got {self.max_aspect_ratio!r}")
        errors.raise_if_any("OIALRConfig")

    def warmup_for(self, total_steps: int | None) -> int | str:
        """``warmup_steps`` in steps for a run of ``total_steps`` optimizer steps: a fraction becomes
        ``max(1, round(fraction · total_steps))`` (``ValueError`` without ``total_steps``); an integer or ``"auto"``
        is returned as is."""
        if total_steps is not None and not (is_int(total_steps) and total_steps >= 1):
            raise ValueError(f"total_steps must be an integer >= 1 (the run's optimizer steps) or None, got "
                             f"{total_steps!r}")
        if not isinstance(self.warmup_steps, float):
            return self.warmup_steps
        if total_steps is None:
            raise ValueError(f"warmup_steps={self.warmup_steps} is a fraction of the run: give the controller "
                             "total_steps (OIALR(..., total_steps=N)) or set warmup_steps in steps")
        return max(1, round(self.warmup_steps * total_steps))

    def to_dict(self) -> dict[str, Any]:
        """Plain-value copy, for checkpoints and results files."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OIALRConfig:
        """The config :meth:`to_dict` wrote; also reads the flat ``stability_every``/``auto_*`` names of older
        results files."""
        values = dict(values)
        legacy = {new: values.pop(old) for old, new in _LEGACY_AUTO.items() if old in values}
        if legacy:
            values["auto"] = {**legacy, **values.get("auto", {})}
        return cls(**values)


def _regex_problem(pattern: Any) -> str | None:
    """Why ``pattern`` does not compile as a regular expression, or None."""
    try:
        re.compile(pattern)
    except (re.error, TypeError) as err:
        return str(err)
    return None


def config_or_default(config: OIALRConfig | None) -> OIALRConfig:
    """``config``, or ``OIALRConfig()`` for ``None``; a ``TypeError`` naming anything else."""
    if config is None:
        return OIALRConfig()
    if not isinstance(config, OIALRConfig):
        raise TypeError(f"config must be an oialr.OIALRConfig (or None for the defaults), got {type(config).__name__}")
    return config
