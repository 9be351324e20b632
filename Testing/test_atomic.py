"""The one atomic writer (IrisSegmentLib/atomic.py): whole file or the old one, the target's mode, no temporaries left."""
from __future__ import annotations

import os
import stat
import sys

import pytest

from IrisSegmentLib.atomic import NEW_FILE_MODE, TEMP_PREFIX, atomic_path, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_new_file_gets_the_usual_mode_and_a_replaced_one_keeps_its_own(tmp_path):
    path = tmp_path / "report.json"
    write_atomic(path, "{}")
    assert path.read_text() == "{}" and _mode(path) == NEW_FILE_MODE
    os.chmod(path, 0o640)
    write_atomic(path, b"[]")
    assert path.read_bytes() == b"[]" and _mode(path) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "seg.nii.gz"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(TEMP_PREFIX) and tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_temporary_names_are_unique(tmp_path):
    with atomic_path(tmp_path / "a.json") as first, atomic_path(tmp_path / "a.json") as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert (tmp_path / "a.json").read_text() == "1"  # the outer block ends last
