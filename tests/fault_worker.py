"""``oialr train`` with a fault injected, for tests/test_faults.py: ``python fault_worker.py FAULT N RANK ARGS...``
runs ``oialr`` with ARGS; in the process of rank RANK (``RANK`` from torchrun, else 0), FAULT is ``KILL``, ``STOP``
or ``TERM``: that signal to itself right after optimizer step N; or ``KILL_IN_WRITE``: SIGKILL half-way through its
N-th write of ``checkpoint.pt`` (the temporary file half written). Launched directly or under torchrun (which
starts its workers in sessions of their own): with ``FAULT_PID_DIR`` set, each process leaves ``PID.pid`` there, so
that the test can end a frozen one."""
import os
import signal
import sys

from oialr import files
from oialr.cli import run as cli_run
from oialr.cli.checkpoint import CHECKPOINT
from oialr.cli.main import main


def signal_after_step(name: str, step: int) -> None:
    real = cli_run.TrainingRun._train_step

    def train_step(self, x, y):
        real(self, x, y)
        if self.step == step:
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))

    cli_run.TrainingRun._train_step = train_step


def kill_in_checkpoint_write(nth: int) -> None:
    real = files.atomic_write
    writes = []

    def atomic_write(path, write):
        if os.path.basename(path) == CHECKPOINT:
            writes.append(path)
        if len(writes) != nth or os.path.basename(path) != CHECKPOINT:
            return real(path, write)

        def half(f):
            write(f)
            f.flush()
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return real(path, half)

    files.atomic_write = atomic_write


if __name__ == "__main__":
    fault, n, who, *args = sys.argv[1:]
    if os.environ.get("FAULT_PID_DIR"):
        open(os.path.join(os.environ["FAULT_PID_DIR"], f"{os.getpid()}.pid"), "w").close()
    if int(os.environ.get("RANK", "0")) == int(who):
        kill_in_checkpoint_write(int(n)) if fault == "KILL_IN_WRITE" else signal_after_step(fault, int(n))
    sys.exit(main(args))
