"""Atomic single-file writes: a reader sees the old file or the complete new one, never a torn one.

It lives in :mod:`samplers` (the bottom layer, torch-free here) so that the schedule files of
:mod:`samplers.schedule` and every layer above can share one writer.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: suffix of the temporary sibling (the same one :mod:`difftools.checkpoint` uses for its directories)
TMP_SUFFIX = ".partial"


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on normal exit it is fsynced and renamed
    over ``path`` (``os.replace``, atomic on POSIX and Windows); on an exception it is deleted and
    ``path`` is left as it was. Missing parent folders are created.

    The temporary name is unique per call (pid + random), so concurrent writers of the same path
    never share a temporary file: the last rename wins with a complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`); returns the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable where the filesystem allows fsync on a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
