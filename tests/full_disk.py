"""A stand-in for a full disk: oialr.files' writes fail with ENOSPC once ``full()`` says so (shared by the fault
tests)."""
import errno
import os
from typing import Callable

from oialr import files


class _FullDiskFile:
    def __init__(self, f, full: Callable[[], bool]):
        self.f, self.full = f, full

    def write(self, data):
        if self.full():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk(monkeypatch, full: Callable[[], bool] = lambda: True) -> None:
    """From now on (until ``monkeypatch.undo()``), every file oialr.files writes fails with ENOSPC while
    ``full()``."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: _FullDiskFile(real_fdopen(fd, mode), full))
