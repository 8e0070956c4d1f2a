"""Crash-safe files: write to a temporary file in the same folder, flush to disk, then rename over the target."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any, Callable

import torch


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...); its previous version, if any, is unchanged."""


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then replace ``path`` with it. A crash or an
    interrupt at any point leaves either the old file or the new one, never a partial file. A failed write (an
    ``OSError``, also when a writer such as ``torch.save`` wraps it) raises :class:`WriteError` naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(path))                 # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(err)
        if cause is None:
            raise
        failed = WriteError(f"cannot write {path}: {cause.strerror or cause}; its previous version is unchanged")
        failed.errno = cause.errno
        raise failed from err


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: itself, or the one it was raised from or during (``torch.save`` wraps a failed
    ``write`` in a ``RuntimeError``)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _read_umask() -> int:
    umask = os.umask(0)                            # the only portable way to read it is to set it; done once, at
    os.umask(umask)                                # import, so no other thread can create a file in between
    return umask


_UMASK = _read_umask()


def _mode(path: str) -> int:
    """The existing file's permissions, else 0666 less the process umask (as read at import)."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows of plain values (nested values are JSON-encoded); columns are the union of keys in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    write_text(path, buffer.getvalue())


def save_torch(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
