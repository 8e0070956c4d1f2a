"""Claiming a run folder for one ``oialr train`` at a time: created and probed for writing before any work, locked
with ``flock`` (released by the kernel when the process ends, however it ends), and cleared of the temporary files
of writes that a kill interrupted."""
from __future__ import annotations

import os
import re
import socket

from .settings import ConfigError

LOCK = ".oialr-train.lock"
ORPHAN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")      # oialr.files.atomic_write's temporary files


class RunFolder:
    """The claim on ``out``: :meth:`claim` takes it (or raises :class:`ConfigError` at once), :meth:`release` gives
    it back. The lock file holds ``pid host`` of the holder, for the message another run gets."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK)
        self._fd: int | None = None

    def claim(self) -> RunFolder:
        """Create and probe ``out``, lock it, remove orphan temporary files. Without ``fcntl`` (Windows) the folder
        is probed but not locked."""
        _make_writable_folder(self.out)
        try:
            import fcntl
        except ImportError:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                who = f"pid {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
                raise ConfigError(f"{self.out} is in use by another oialr train ({who}); wait for it to end or choose "
                                  "another --out") from None
            if _same_file(fd, self.path):     # not a lock file that its holder unlinked while we opened it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        remove_orphans(self.out)
        return self

    def release(self) -> None:
        """Unlink the lock file, then unlock (in this order, so that no one locks a file about to vanish)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _make_writable_folder(out: str) -> None:
    """Create ``out`` and write a probe file in it, or raise :class:`ConfigError` saying why not."""
    probe = os.path.join(out, f".oialr-probe-{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"--out {out} cannot hold a run: {err.strerror or err} ({err.filename or out}); choose a "
                          "folder you can write to") from None


def remove_orphans(out: str) -> list[str]:
    """Delete the temporary files (``.NAME.XXXXXXXX.tmp``) that killed writes left in ``out``; their names."""
    removed = sorted(name for name in os.listdir(out) if ORPHAN.match(name))
    for name in removed:
        os.unlink(os.path.join(out, name))
    return removed
