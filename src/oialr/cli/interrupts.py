"""Stopping a training run on SIGINT/SIGTERM: the handlers installed while it trains, and the error (and exit code)
once its checkpoint is saved."""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_POLL_EVERY = 10    # distributed: all-reduce the stop flag every this many steps (each poll syncs the device)


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, step: int, path: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved to {path}; "
                         "continue with --resume")
        self.signum = signum


@contextmanager
def stop_signals_to(handler):
    """Route :data:`STOP_SIGNALS` to ``handler(signum, frame)`` inside the block; the previous handlers after it."""
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def stop_signals_held():
    """Drop :data:`STOP_SIGNALS` inside the block (the run's own handlers nest inside it). Around a run's end: when
    one process of a torchrun job dies, torchrun sends SIGTERM to the others at once, and the default action would
    kill them before they say why they stop; the process ends right after the block anyway."""
    with stop_signals_to(lambda signum, frame: None):
        yield


def exit_code(err: Interrupted) -> int:
    """The shell's code for a process ended by the signal: ``128 + signum`` (1 on Windows)."""
    return 128 + err.signum if sys.platform != "win32" else 1
