"""oialr.files: crash-safe writes leave the old file or the new one, with ordinary permissions."""
import os
import stat

import pytest

from oialr import files


def test_atomic_write_replaces_whole_and_keeps_nothing_on_failure(tmp_path):
    path = str(tmp_path / "sub" / "r.json")
    files.write_json(path, {"a": 1})
    assert open(path).read() == '{\n  "a": 1\n}\n'

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        files.atomic_write(path, fail)
    assert open(path).read() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path / "sub") == ["r.json"]          # no temporary file left behind


def test_new_files_get_the_umask_mode_and_existing_files_keep_theirs(tmp_path, monkeypatch):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")                                      # what open() gives under this process's umask
    files.write_text(str(tmp_path / "atomic.txt"), "x")
    assert os.stat(tmp_path / "atomic.txt").st_mode == os.stat(plain).st_mode

    monkeypatch.setattr(files, "_UMASK", 0o022)
    path = str(tmp_path / "new.txt")
    files.write_text(path, "x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644          # not mkstemp's 0600
    os.chmod(path, 0o600)
    files.write_text(path, "y")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and open(path).read() == "y"
