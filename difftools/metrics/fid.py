"""Fréchet distance (FID / fd_<features>) and KID between two image sets: :func:`compare`.

The parts, one job each:

* :mod:`difftools.metrics.images`: image sources (folders, npz, tensors, iterables) as uint8 batches;
* :mod:`difftools.metrics.stats`: feature statistics (mean, covariance, n), how they are computed,
  their file format and its protocol check;
* :mod:`difftools.metrics.distances`: the Fréchet distance and KID between two statistics;
* :mod:`difftools.metrics.reference`: reference statistics of a dataset (cached, or from a file).

Their public names are importable from here too. With the same Inception weights file,
``compare(folder_a, folder_b)`` equals ``cleanfid.fid.compute_fid(folder_a, folder_b,
mode="legacy_pytorch")`` (tested to 1e-4).
"""

from __future__ import annotations

from pathlib import Path

from difftools.images import float_to_uint8
from difftools.metrics.distances import fd, kid, result
from difftools.metrics.features import FeatureExtractor, build_extractor
from difftools.metrics.images import (
    as_uint8_batch,
    dataset_images,
    describe,
    images_sha256,
    iter_images,
    list_image_files,
    load_npz_images,
    read_image,
)
from difftools.metrics.reference import pick_reference, reference_from_file, reference_path, reference_stats
from difftools.metrics.stats import (
    STATS_VERSION,
    FrechetSampleSizeWarning,
    Stats,
    StatsFileError,
    StatsMismatchError,
    check_sample_size,
    check_stats,
    compute_stats,
    extract_features,
    gaussian_fit,
    is_stats_file,
    stats_from_features,
)

__all__ = [
    "STATS_VERSION", "FrechetSampleSizeWarning", "Stats", "StatsFileError", "StatsMismatchError",
    "as_uint8_batch", "check_sample_size", "check_stats", "compare", "compute_stats", "dataset_images",
    "describe", "extract_features", "fd", "float_to_uint8", "gaussian_fit", "images_sha256", "is_stats_file",
    "iter_images", "kid", "list_image_files", "load_npz_images", "pick_reference", "read_image",
    "reference_from_file", "reference_path", "reference_stats", "result", "stats_from_features",
]


def compare(
    a,
    b,
    features: str | Path | FeatureExtractor = "inception",
    with_kid: bool = True,
    batch_size: int | None = None,
    device=None,
    weights: str | Path | None = None,
    mode: str | None = None,
    allow_download: bool = False,
    progress: bool = False,
) -> dict:
    """Fréchet distance (and KID) between two image sources (or statistics) in one feature space.

    Returns ``{"metric": "fid" | "fd_<name>", "value", "kid", "n_a", "n_b", "protocol"}``; statistics
    made in another feature space are a :class:`StatsMismatchError`."""
    ext = build_extractor(features, device=device, weights=weights, mode=mode, allow_download=allow_download)
    sa = compute_stats(a, ext, batch_size, progress)
    sb = compute_stats(b, ext, batch_size, progress)
    return result(ext, sa, sb, with_kid, describe(a), describe(b))
