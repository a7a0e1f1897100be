"""File utilities every package shares: atomic writes, file hashes, the cache folder.

One home for them, so that checkpoints, statistics files, schedule files and caches are written and
identified the same way everywhere:

* :func:`atomic_file` / :func:`write_text_atomic` are :mod:`samplers.atomic`'s (the bottom layer,
  where the S³ schedule files need them): a reader sees the old file or the complete new one;
* :func:`file_sha256` identifies weights and data files (checkpoints record it, feature spaces are
  keyed by it);
* :func:`cache_dir` is the root of everything difftools caches (metric classifiers, reference
  statistics, Inception weights);
* :func:`data_roots` are the folders searched for datasets and autoencoder weights (``root=`` or
  $DIFFTOOLS_DATA; the layout is in docs/data.md, which error messages cite as :data:`DATA_DOCS`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from samplers.atomic import atomic_file, write_text_atomic

__all__ = [
    "DATA_DOCS",
    "atomic_file",
    "cache_dir",
    "data_root_setting",
    "data_roots",
    "file_sha256",
    "write_text_atomic",
]

DATA_DOCS = "docs/data.md"  # the page that lists every data file: layout, checksum, where to get it
_CHECKOUT = Path(__file__).resolve().parents[1]


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


def data_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for dataset files and autoencoder weights, in order: ``root`` if given, else
    $DIFFTOOLS_DATA.

    With neither, the last resort is the data folder of this repository's development checkout
    (``shared/data`` beside the checkout or beside the current directory), which its own tests read;
    users give ``root=`` / ``data.root=`` or set DIFFTOOLS_DATA (docs/data.md)."""
    if root is not None:
        return [Path(root).expanduser()]
    if os.environ.get("DIFFTOOLS_DATA"):
        return [Path(os.environ["DIFFTOOLS_DATA"]).expanduser()]
    roots = [_CHECKOUT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return list(dict.fromkeys(p.resolve() for p in roots))


def data_root_setting(root: str | os.PathLike | None = None) -> str:
    """Which setting chose the data folder, for error messages: ``now root=...``, ``now
    DIFFTOOLS_DATA=...``, or that neither is set."""
    if root is not None:
        return f"now root={root}"
    if os.environ.get("DIFFTOOLS_DATA"):
        return f"now DIFFTOOLS_DATA={os.environ['DIFFTOOLS_DATA']}"
    return "neither is set now"
