"""Starting ``oialr train``'s run: claim the run folder, then a new :class:`TrainingRun` or one restored from the
folder's checkpoint."""
from __future__ import annotations

import os

from .. import distributed
from .checkpoint import CHECKPOINT, read_checkpoint, resumed_config
from .run import TrainingRun
from .run_folder import RunFolder
from .settings import ConfigError, TrainConfig


def start_or_resume(cfg: TrainConfig | None, out: str, resume: bool, *, log=print,
                    given: set[str] | None = None) -> TrainingRun:
    """A ready :class:`TrainingRun`: new (``out`` must not hold one) or restored from ``out/checkpoint.pt``.

    On resume the saved config is used; ``cfg`` (when given) must agree with it on every setting, or on those named
    in ``given`` (the ones the user set: :func:`oialr.cli.settings.given_settings`). Process 0 first claims ``out``
    (:class:`RunFolder`: writable, not in use by another run); the claim is held until :meth:`TrainingRun.train`
    ends."""
    folder = RunFolder(out).claim() if distributed.process_rank() == 0 else None
    try:
        run = _start_or_resume(cfg, out, resume, log, given)
    except BaseException:
        if folder is not None:
            folder.release()
        raise
    run.folder = folder
    return run


def _start_or_resume(cfg: TrainConfig | None, out: str, resume: bool, log, given: set[str] | None) -> TrainingRun:
    path = os.path.join(out, CHECKPOINT)
    if not resume:
        if os.path.exists(path):
            raise ConfigError(f"{out} already holds a run ({path}); pass --resume to continue it or choose "
                              "another --out")
        run = TrainingRun(cfg, out, log=log)
        run.setup()
        return run
    if not os.path.exists(path):
        raise ConfigError(f"nothing to resume: {path} does not exist; start the run without --resume")
    state = read_checkpoint(path)
    saved = resumed_config(state, path, cfg, given)
    run = TrainingRun(saved, out, log=log)
    run.setup()
    try:
        run.load_checkpoint(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{path} does not fit the run its settings describe ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0][:200]}); restore the file or start a new run") from None
    run.log(f"resumed {out} at epoch {run.epoch}, step {run.step}")
    return run
