"""Feature statistics of an image set (mean, covariance, n), how they are computed, and their file.

Mean and covariance are taken exactly as clean-fid takes them (``np.mean`` / ``np.cov`` of the float32
feature matrix), so a Fréchet distance from them equals clean-fid's.

The statistics file (``.npz``, :meth:`Stats.save` / :meth:`Stats.load`) is what lets a distance to a
dataset be computed without the dataset, like clean-fid's custom statistics: it holds

* ``mu`` [D], ``sigma`` [D, D] (float64) and, optionally, ``feats``: up to 10,000 feature rows for KID;
* ``meta`` (JSON): ``version``, ``n``, ``extractor`` (the feature space's key: its name and the first
  digits of its weights' sha256), ``metric``, ``protocol`` (the extractor's: weights file and full
  sha256, resize path, input), ``dataset`` (name, split, image_size, max_items, for statistics of a
  toolkit dataset), ``source`` and ``source_sha256`` (the sha256 of the uint8 pixels they came from).

A file is only used with the feature extractor it was made with: :func:`check_stats` compares the
recorded protocol with the extractor (and the dataset / split / image size a caller expects) and
raises :class:`StatsMismatchError` naming the file, both sides and how to remake the file. ``.npz``
files with just ``mu`` and ``sigma`` (clean-fid's) load too; with nothing recorded, only their
dimension can be checked.

Sample size: a covariance needs n >= 2 images (fewer is a ValueError), and with n below the feature
dimension d it has rank <= n - 1 < d, so the distance is dominated by the estimate's bias and moves
with n; every statistics computation warns (:class:`FrechetSampleSizeWarning`) in that case.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from difftools.files import atomic_file
from difftools.metrics.features import FeatureExtractor
from difftools.metrics.images import describe, iter_images

#: version 2 added the ``dataset`` record; version 1 files load with it empty
STATS_VERSION = 2
KID_FEATURES = 10_000


class FrechetSampleSizeWarning(UserWarning):
    """Fewer images than feature dimensions: the covariance is singular and a Fréchet distance from
    it is not meaningful (biased; it changes with n)."""


class StatsFileError(ValueError):
    """A file that should hold statistics cannot be read as such (the message names it)."""


class StatsMismatchError(ValueError):
    """Statistics made in another feature space, or of another dataset / split / image size, than the
    comparison asks for (the message names the file, both sides and how to remake it)."""


def check_sample_size(n: int, dim: int, source: str = "") -> None:
    """ValueError for n < 2 (no covariance), FrechetSampleSizeWarning for n < dim."""
    where = f"{source}: " if source else ""
    if n < 2:
        raise ValueError(
            f"{where}{n} image{'s' if n != 1 else ''}; a Fréchet distance needs a covariance, so at least "
            f"2 images per set (and at least the feature dimension, {dim}, to be meaningful)"
        )
    if n < dim:
        warnings.warn(
            f"{where}n = {n} images is below the feature dimension {dim}: the covariance has rank "
            f"<= {n - 1}, so a Fréchet distance from it is not meaningful (biased, and it changes with n). "
            f"Use n >= {dim} and compare distances only at equal n.",
            FrechetSampleSizeWarning,
            stacklevel=3,
        )


@dataclass
class Stats:
    """Feature statistics of one image set: mean, covariance, n, a feature subset for KID, and the
    protocol they were made with (see the module docstring for each field)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feats: np.ndarray | None = None
    extractor: str = ""
    metric: str = ""
    protocol: dict = field(default_factory=dict)
    source: str = ""
    source_sha256: str = ""
    dataset: dict = field(default_factory=dict)

    def meta(self) -> dict:
        return {
            "version": STATS_VERSION,
            "n": self.n,
            "extractor": self.extractor,
            "metric": self.metric,
            "protocol": self.protocol,
            "dataset": self.dataset,
            "source": self.source,
            "source_sha256": self.source_sha256,
        }

    def save(self, path: str | Path, features: bool = True) -> Path:
        """Write to ``path`` (npz) atomically (:func:`difftools.files.atomic_file`). ``features=False``
        leaves out the KID feature rows: a file of mean + covariance only (e.g. 2 MB for 512
        features), with which KID is not available."""
        path = Path(path)
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta()))}
        if features and self.feats is not None:
            arrays["feats"] = self.feats
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append .npz to the temporary name
        return path

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        """Read a file written by :meth:`save` (or any npz with ``mu`` and ``sigma``); a
        :class:`StatsFileError` naming the file when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {path} does not exist")
        try:
            with np.load(path) as z:
                if "mu" not in z or "sigma" not in z:
                    raise StatsFileError(f"{path} is not a statistics file: it holds {sorted(z.keys())}, "
                                         "not 'mu' and 'sigma' (write one with scripts/fid.py --save-stats)")
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
                mu, sigma = z["mu"], z["sigma"]
                feats = z["feats"] if "feats" in z else None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            if isinstance(err, StatsFileError):
                raise
            raise StatsFileError(f"{path} is not a readable statistics file ({type(err).__name__}: "
                                 f"{err})") from err
        version = int(meta.get("version", 1))
        if version > STATS_VERSION:
            raise StatsFileError(f"{path} is a version {version} statistics file; this difftools reads up to "
                                 f"version {STATS_VERSION}: update difftools")
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise StatsFileError(f"{path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} are not a "
                                 "mean and its covariance (expected [D] and [D, D])")
        return cls(
            mu=mu,
            sigma=sigma,
            n=int(meta.get("n", -1)),
            feats=feats,
            extractor=meta.get("extractor", ""),
            metric=meta.get("metric", ""),
            protocol=meta.get("protocol", {}),
            source=meta.get("source", str(path)),
            source_sha256=meta.get("source_sha256", ""),
            dataset=meta.get("dataset") or {},
        )


def is_stats_file(source) -> bool:
    """Whether ``source`` names an ``.npz`` file holding statistics (``mu`` and ``sigma``)."""
    if not isinstance(source, (str, Path)) or Path(source).suffix != ".npz" or not Path(source).is_file():
        return False
    with np.load(source) as z:
        return "mu" in z and "sigma" in z


def _features_named(stats: Stats) -> str:
    proto = stats.protocol or {}
    made_from = proto.get("classifier") or proto.get("weights")
    sha = proto.get("weights_sha256")
    details = ", ".join(x for x in (f"from {made_from}" if made_from else "",
                                    f"weights sha256 {sha}" if sha else "") if x)
    return f"{stats.extractor!r}" + (f" ({details})" if details else "")


def check_stats(stats: Stats, extractor: FeatureExtractor, where: str = "", *, dataset: str | None = None,
                split: str | None = None, image_size: int | None = None) -> Stats:
    """Refuse statistics that were not made in ``extractor``'s feature space (its key: name and
    weights hash; the full weights sha256 where both record it; the dimension), or not of the
    ``dataset`` / ``split`` / ``image_size`` asked for (checked where the file records them; a file
    that records no extractor, e.g. clean-fid's, is checked by its dimension only). Returns
    ``stats``; raises :class:`StatsMismatchError` naming ``where``."""
    where = where or stats.source or "statistics"
    remake = ("Use the feature extractor they were made with, or remake them for this one: python "
              "scripts/fid.py <images, or dataset:NAME:SPLIT> --features <this extractor> --save-stats "
              f"{where}")
    ours = extractor.protocol().get("weights_sha256")
    theirs = (stats.protocol or {}).get("weights_sha256")
    if (stats.extractor and stats.extractor != extractor.key()) or (ours and theirs and ours != theirs):
        yours = f"{extractor.key()!r}" + (f" (weights sha256 {ours})" if ours else "")
        raise StatsMismatchError(f"{where}: statistics were computed with features "
                                 f"{_features_named(stats)}, but the feature extractor is {yours}; a Fréchet "
                                 "distance compares features of one network with one set of weights. "
                                 + remake)
    if extractor.dim and len(stats.mu) != extractor.dim:
        raise StatsMismatchError(f"{where}: statistics of {len(stats.mu)}-dimensional features, but "
                                 f"{extractor.key()!r} gives {extractor.dim}. {remake}")
    recorded = stats.dataset or {}
    for key, want in (("name", dataset), ("split", split), ("image_size", image_size)):
        have = recorded.get(key)
        if want is not None and have is not None and str(have) != str(want):
            raise StatsMismatchError(f"{where}: statistics of dataset {recorded.get('name')!r} split "
                                     f"{recorded.get('split')!r} at {recorded.get('image_size')}px, but "
                                     f"{key} {want!r} was asked for. Pass the matching statistics file, or "
                                     f"make one: python scripts/fid.py dataset:{dataset or 'NAME'}:"
                                     f"{split or 'SPLIT'} --image-size {image_size or 'SIZE'} --features "
                                     f"<extractor> --save-stats OUT.npz")
    return stats


def extract_features(
    source,
    extractor: FeatureExtractor,
    batch_size: int | None = None,
    progress: bool = False,
    max_items: int | None = None,
) -> tuple[np.ndarray, str]:
    """All features of ``source`` as float32 [N, D] (batched on the extractor's device) and the
    sha256 of the uint8 images they came from."""
    h, feats, n = hashlib.sha256(), [], 0
    bar = tqdm(desc=f"features ({extractor.name})", unit="img", disable=not progress)
    for batch in iter_images(source, batch_size or extractor.batch_size):
        if max_items is not None:
            batch = batch[: max_items - n]
        h.update(batch.cpu().numpy().tobytes())
        feats.append(extractor(batch).numpy())
        n += len(batch)
        bar.update(len(batch))
        if max_items is not None and n >= max_items:
            break
    bar.close()
    if n == 0:
        raise ValueError(f"image source {describe(source)} is empty")
    return np.concatenate(feats).astype(np.float32, copy=False), h.hexdigest()


def gaussian_fit(feats: np.ndarray) -> Stats:
    """Bare Gaussian fit (mean, covariance, n) of a feature matrix [n, d], for ad-hoc distances.
    n < 2 is a ValueError, n < d a FrechetSampleSizeWarning."""
    feats = np.asarray(feats, dtype=np.float64)
    check_sample_size(len(feats), feats.shape[1] if feats.ndim == 2 else 1)
    return Stats(mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), n=len(feats))


def stats_from_features(
    feats: np.ndarray,
    extractor: FeatureExtractor,
    source: str = "",
    source_sha256: str = "",
    kid_features: int = KID_FEATURES,
    seed: int = 0,
) -> Stats:
    """Mean and covariance exactly as clean-fid takes them; keeps at most ``kid_features`` feature
    rows (a fixed random subset) for KID. n < 2 is a ValueError, n < d a FrechetSampleSizeWarning
    (both naming ``source``)."""
    check_sample_size(len(feats), feats.shape[1], source)
    mu = np.mean(feats, axis=0)
    sigma = np.cov(feats, rowvar=False)
    keep = feats
    if len(feats) > kid_features:
        keep = feats[np.sort(np.random.default_rng(seed).choice(len(feats), kid_features, replace=False))]
    return Stats(
        mu=mu,
        sigma=sigma,
        n=len(feats),
        feats=keep,
        extractor=extractor.key(),
        metric=extractor.metric,
        protocol=extractor.protocol(),
        source=source,
        source_sha256=source_sha256,
    )


def compute_stats(
    source,
    extractor: FeatureExtractor,
    batch_size: int | None = None,
    progress: bool = False,
    max_items: int | None = None,
    kid_features: int = KID_FEATURES,
) -> Stats:
    """Statistics of an image source in ``extractor``'s feature space. Statistics (a :class:`Stats` or a
    statistics file) are returned as they are, after :func:`check_stats` against the extractor."""
    if isinstance(source, Stats):
        return check_stats(source, extractor)
    if is_stats_file(source):
        return check_stats(Stats.load(source), extractor, str(source))
    feats, sha = extract_features(source, extractor, batch_size, progress, max_items)
    return stats_from_features(feats, extractor, describe(source), sha, kid_features)
