"""File utilities every package shares: atomic writes, file hashes, the cache folder.

One home for them, so that checkpoints, statistics files, schedule files and caches are written and
identified the same way everywhere:

* :func:`atomic_file` / :func:`write_text_atomic` are :mod:`samplers.atomic`'s (the bottom layer,
  where the S³ schedule files need them): a reader sees the old file or the complete new one;
* :func:`file_sha256` identifies weights and data files (checkpoints record it, feature spaces are
  keyed by it);
* :func:`cache_dir` is the root of everything difftools caches (metric classifiers, reference
  statistics, Inception weights).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from samplers.atomic import atomic_file, write_text_atomic

__all__ = ["atomic_file", "cache_dir", "file_sha256", "write_text_atomic"]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Root of difftools' caches: ``$DIFFTOOLS_CACHE`` or ``~/.cache/difftools``."""
    return Path(os.environ.get("DIFFTOOLS_CACHE", Path.home() / ".cache" / "difftools"))
