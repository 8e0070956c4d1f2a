"""Stopping a CLI training run after a given step, as a SIGTERM would (shared by the CLI tests)."""
import signal

from oialr.cli import run as cli_run


def interrupt_after(monkeypatch, steps):
    """Make every ``TrainingRun`` ask to stop (SIGTERM) once it has taken ``steps`` optimizer steps."""
    real = cli_run.TrainingRun._train_step

    def step(self, x, y):
        real(self, x, y)
        if self.step == steps:
            self._stop_signal = signal.SIGTERM

    monkeypatch.setattr(cli_run.TrainingRun, "_train_step", step)
