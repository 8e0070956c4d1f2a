"""The failures that end a training run after it started, each as one line that says what is kept and what to do:
a diverged state the controller refused, a file that could not be written, a process that stopped answering."""
from __future__ import annotations

from ..files import WriteError
from ..health import DegenerateStateError

class Diverged(Exception):
    """The training loss became NaN or Inf; the run stops before saving that state."""

    def __init__(self, loss: float, epoch: float, step: int):
        super().__init__(f"training diverged: train loss {loss} at epoch {epoch} (step {step}); the state was not "
                         "saved; lower the learning rate or set grad_clip")
        self.loss, self.epoch, self.step = loss, epoch, step


# Words of gloo's and NCCL's errors when a peer is gone (connection closed or reset) or silent (the timeout).
PEER_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "peer")


def describe(err: BaseException, out: str, *, rank: int, world_size: int, timeout: float) -> str | None:
    """One line for ``err`` if it is a failure of the run (not of oialr), else None (let it propagate)."""
    kept = f"the last checkpoint in {out} is kept"
    if isinstance(err, (DegenerateStateError, Diverged)):
        return f"{err} ({kept})"
    if isinstance(err, WriteError):
        return f"{err}; free some space or fix the permissions of {out}, then continue with --resume"
    if world_size > 1 and isinstance(err, RuntimeError) and is_peer_failure(err):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"process {rank} of {world_size}: another process of the job died, or stopped answering for longer "
                f"than dist_timeout={timeout:g}s ({first[:200]}); {kept}; continue with --resume")
    return None


def is_peer_failure(err: BaseException) -> bool:
    text = str(err).lower()
    return any(word in text for word in PEER_FAILURE)
