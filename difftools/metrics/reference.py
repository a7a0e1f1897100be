"""Reference statistics of a dataset: cached when computed from the dataset, or read from a file.

* :func:`reference_stats` computes the statistics of a toolkit dataset split in one feature space
  once and caches them (``<cache>/stats/<dataset>_<split>_<size>px_<features>.npz``, with the sha256
  of the uint8 images they came from). When the image size is given, a cached file is read without
  touching the dataset, so the dataset's files need not be present.
* :func:`reference_from_file` reads a statistics file made elsewhere (``scripts/fid.py
  --save-stats``) and checks that it was made with the given feature extractor and, where asked,
  of the given dataset / split / image size: evaluation from statistics alone, like clean-fid's
  custom statistics (a GPU run then carries a 2 MB file instead of the dataset).
* :func:`pick_reference` chooses, from several files, the one made in an extractor's feature space.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from difftools.data import build_dataset
from difftools.files import cache_dir
from difftools.metrics.features import FeatureExtractor
from difftools.metrics.images import dataset_images, first_images, images_sha256
from difftools.metrics.stats import (
    Stats,
    StatsMismatchError,
    check_stats,
    extract_features,
    stats_from_features,
)


def reference_path(
    dataset: str,
    split: str,
    image_size: int,
    extractor: FeatureExtractor,
    max_items: int | None = None,
    cache: str | Path | None = None,
) -> Path:
    """Where :func:`reference_stats` caches the statistics (``cache`` default ``<cache_dir>/stats``)."""
    root = Path(cache) if cache is not None else cache_dir() / "stats"
    n = f"_n{max_items}" if max_items else ""
    return root / f"{dataset}_{split}_{image_size}px_{extractor.key()}{n}.npz"


def dataset_record(dataset: str, split: str, image_size: int, max_items: int | None = None) -> dict:
    """What a statistics file records about the dataset it describes."""
    return {"name": dataset, "split": split, "image_size": int(image_size), "max_items": max_items}


def reference_stats(
    dataset: str,
    extractor: FeatureExtractor,
    split: str = "train",
    image_size: int | None = None,
    root: str | os.PathLike | None = None,
    max_items: int | None = None,
    cache: str | Path | None = None,
    refresh: bool = False,
    verify: bool = False,
    progress: bool = False,
) -> Stats:
    """Statistics of a toolkit dataset split in one feature space, computed once and cached.

    With ``image_size`` given, a cached file is used without building the dataset (its files may be
    absent); without it the dataset is built to learn its default size. The cache file records the
    sha256 of the uint8 images it was computed from; ``verify=True`` re-reads the dataset, recomputes
    that checksum and recomputes the statistics on a mismatch."""
    ds = None
    if image_size is None:  # the dataset's own default size is known only from the dataset
        ds = build_dataset(dataset, root=root, split=split)
        image_size = ds.info.image_size
    path = reference_path(dataset, split, image_size, extractor, max_items, cache)
    source = f"dataset:{dataset}/{split}/{image_size}px" + (f"/first{max_items}" if max_items else "")
    if path.is_file() and not refresh:
        stats = Stats.load(path)
        fresh = stats.extractor == extractor.key() and stats.source == source
        if fresh and verify:
            if ds is None:
                ds = build_dataset(dataset, root=root, split=split, image_size=image_size)
            fresh = images_sha256(first_images(dataset_images(ds), max_items))[0] == stats.source_sha256
        if fresh:
            stats.dataset = stats.dataset or dataset_record(dataset, split, image_size, max_items)
            return stats
    if ds is None:
        ds = build_dataset(dataset, root=root, split=split, image_size=image_size)
    images = first_images(dataset_images(ds), max_items)
    feats, sha = extract_features(images, extractor, progress=progress)
    stats = stats_from_features(feats, extractor, source, sha)
    stats.dataset = dataset_record(dataset, split, image_size, max_items)
    stats.save(path)
    return stats


def reference_from_file(
    path: str | os.PathLike,
    extractor: FeatureExtractor,
    dataset: str | None = None,
    split: str | None = None,
    image_size: int | None = None,
) -> Stats:
    """A statistics file (``scripts/fid.py --save-stats``), checked against ``extractor`` and the
    dataset / split / image size asked for (:func:`~difftools.metrics.stats.check_stats`)."""
    return check_stats(Stats.load(path), extractor, str(path), dataset=dataset, split=split,
                       image_size=image_size)


def pick_reference(
    paths: Sequence[str | os.PathLike],
    extractor: FeatureExtractor,
    dataset: str | None = None,
    split: str | None = None,
    image_size: int | None = None,
) -> Stats:
    """The statistics file among ``paths`` made in ``extractor``'s feature space (one file per
    feature space; a single file is checked directly, so its error says what differs). A
    :class:`StatsMismatchError` lists every file's feature space when none matches."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return reference_from_file(paths[0], extractor, dataset, split, image_size)
    loaded = [(p, Stats.load(p)) for p in paths]
    for p, stats in loaded:
        if stats.extractor == extractor.key():
            return check_stats(stats, extractor, str(p), dataset=dataset, split=split, image_size=image_size)
    listing = "\n".join(f"  {p}: features {s.extractor or '(not recorded)'!r}" for p, s in loaded)
    raise StatsMismatchError(
        f"none of the {len(paths)} statistics files was made with features {extractor.key()!r}:\n{listing}\n"
        "Add one for it (python scripts/fid.py dataset:NAME:SPLIT --features <extractor> --save-stats "
        "OUT.npz), or leave that feature space out."
    )
