"""The output folder: file modes that follow the umask, one writer at a time, and a folder that can be
written checked before any work."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipelines.io import atomic_dir, write_json_atomic, write_text_atomic


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


# ---------------------------------------------------------------- file modes

@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    text = write_text_atomic(tmp_path / "report.md", "# report\n")
    record = write_json_atomic(tmp_path / "stages" / "rtn.json", {"key": "k1"})
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"\x00")
    assert (mode(text), mode(record)) == (file_mode, file_mode)
    assert (mode(tmp_path / "model"), mode(tmp_path / "stages")) == (dir_mode, dir_mode)
    assert text.read_text() == "# report\n"


def test_an_overwrite_takes_the_umask_mode_and_leaves_no_temporary_file(tmp_path, umask):
    path = tmp_path / "results.json"
    path.write_text("old")
    path.chmod(0o600)
    umask(0o022)
    write_json_atomic(path, {"a": 1})
    assert mode(path) == 0o644 and path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = write_text_atomic(tmp_path / "report.md", "old")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # the temporary file exists when the write fails
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
