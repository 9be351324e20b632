"""Atomic file writes: every file the library writes appears whole, or the old one stays as it was.

A unique temporary file in the target's folder (so the rename never crosses file systems), synced to disk, given
the target's permissions (a new file: what open() would give it), then renamed over the target.
"""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_PREFIX = ".iris-"  # a batch deletes the temporaries that a crash left in its output folder (cohort/results.py)


def _new_file_mode() -> int:
    """0666 less the process's umask: the permissions open() gives a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


NEW_FILE_MODE = _new_file_mode()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, with its suffixes (writers that choose the format by the name see the same one),
    for the block to write; when the block ends without an error it replaces `path`. On an error it is removed."""
    target = Path(path)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix="".join(target.suffixes))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if target.is_file() else NEW_FILE_MODE)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8, line ends as given) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
