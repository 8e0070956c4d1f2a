"""Reading a run's ``checkpoint.pt`` for ``--resume``: a file oialr did not write, or settings that differ from the
saved run's, are refused with one line."""
from __future__ import annotations

from typing import Any

import torch

from .settings import ConfigError, TrainConfig, build_config, flat_settings

CHECKPOINT = "checkpoint.pt"          # in the run folder: written by TrainingRun.save_checkpoint
KEYS = ("config", "epoch", "batch_in_epoch", "step", "train_seconds", "metrics", "controller", "model", "optimizer",
        "rng")
LAUNCH_SETTINGS = ("dist_timeout",)     # settings of one launch, not of the run: --resume may change them


def read_checkpoint(path: str) -> dict[str, Any]:
    """The state dict ``oialr train`` saved at ``path``, or :class:`ConfigError` if the file is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                    # pickle, zip and torch errors: all mean "not our file"
        raise ConfigError(f"{path} is not a checkpoint written by oialr train ({type(err).__name__}: "
                          f"{_first_line(err)}); restore the file or start a new run in another --out") from None
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else list(KEYS)
    if missing:
        raise ConfigError(f"{path} is not a checkpoint written by oialr train (it lacks {', '.join(missing)}); "
                          "restore the file or start a new run in another --out")
    return state


def resumed_config(state: dict[str, Any], path: str, cfg: TrainConfig | None, given: set[str] | None) -> TrainConfig:
    """The saved run's settings, refusing any setting ``cfg`` gives another value: every setting, or only those
    named in ``given`` (what the user set). Launch settings (``dist_timeout``) are taken from ``cfg``."""
    try:
        saved = build_config(state["config"])
    except ConfigError as err:
        raise ConfigError(f"{path} holds settings this oialr does not accept: {'; '.join(err.problems)}") from None
    if cfg is None:
        return saved
    here, there = flat_settings(cfg), flat_settings(saved)
    names = list(there) + [k for k in here if k not in there]
    diffs = [f"{k}: saved {there.get(k)!r}, given {here.get(k)!r}" for k in names
             if k not in LAUNCH_SETTINGS and (given is None or k in given) and there.get(k) != here.get(k)]
    if diffs:
        raise ConfigError("--resume continues the saved run; its settings differ from the ones given:\n  "
                          + "\n  ".join(diffs))
    for name in LAUNCH_SETTINGS:
        setattr(saved, name, getattr(cfg, name))
    return saved


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"
