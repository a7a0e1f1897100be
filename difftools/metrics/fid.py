"""Fréchet distance (FID / fd_<features>) and KID between image sets, on clean-fid's math.

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))     (Heusel et al. 2017, arXiv 1706.08500)
    KID = unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3        (Bińkowski et al. 2018, arXiv 1801.01401)

Both are computed by clean-fid's own ``frechet_distance`` and ``kernel_distance`` (arXiv 2104.11222)
on features from :mod:`difftools.metrics.features`; mean and covariance as clean-fid takes them
(``np.mean`` / ``np.cov`` of the float32 feature matrix). With the same Inception weights file,
``compare(folder_a, folder_b)`` therefore equals ``cleanfid.fid.compute_fid(folder_a, folder_b,
mode="legacy_pytorch")`` (tested to 1e-4).

An image set (``ImageSource``) is any of

* a folder of images (searched recursively like clean-fid; grey images stay one channel, others
  become RGB as with PIL ``convert('RGB')``),
* an ``.npz`` file holding uint8 images ``[N,H,W,C]``, ``[N,C,H,W]`` or ``[N,H,W]`` (key ``images``,
  ``x``, ``arr_0`` or its only array), or statistics written by :meth:`Stats.save` (key ``mu``),
* an in-memory uint8 array/tensor, or a float tensor in [-1, 1] (quantised exactly as a PNG
  writer would, so in-memory and saved samples give the same number),
* an iterable (e.g. a generator) of such batches, or of ``(images, labels)`` pairs,
* a :class:`Stats` object (reference statistics).

Reference statistics of a toolkit dataset (per dataset / split / resolution / feature space) are
computed once by :func:`reference_stats` and cached as npz together with the sha256 of the uint8
source images they came from.

Sample size: a covariance needs n >= 2 images (fewer is a ValueError), and with n below the feature
dimension d it has rank <= n - 1 < d, so the distance is dominated by the estimate's bias and moves
with n; every statistics computation warns (:class:`FrechetSampleSizeWarning`) in that case.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import numpy as np
import torch
from cleanfid.fid import frechet_distance, kernel_distance
from cleanfid.utils import EXTENSIONS
from PIL import Image
from tqdm.auto import tqdm

from difftools.data.base import CorruptDataError, decode_errors
from difftools.metrics.features import FeatureExtractor, build_extractor, cache_dir

STATS_VERSION = 1


class FrechetSampleSizeWarning(UserWarning):
    """Fewer images than feature dimensions: the covariance is singular and a Fréchet distance from
    it is not meaningful (biased; it changes with n)."""


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


# --------------------------------------------------------------------------------- image sources
def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 the way an image writer stores them: round((x + 1) * 127.5), clipped."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def as_uint8_batch(x) -> torch.Tensor:
    """One batch (array or tensor) -> uint8 tensor [B, C, H, W]."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image array or tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"images must be [N,H,W], [N,C,H,W] or [N,H,W,C], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"integer images must be uint8, got {x.dtype}")
        x = float_to_uint8(x)
    return x.contiguous()


def list_image_files(folder: str | Path) -> list[str]:
    """Image files under ``folder``, recursively, sorted (clean-fid's order and extensions)."""
    return sorted(
        f for ext in EXTENSIONS for f in glob(os.path.join(str(folder), f"**/*.{ext}"), recursive=True)
    )


def read_image(path: str) -> np.ndarray:
    """HWC uint8; grey stays one channel, every other mode becomes RGB."""
    if path.endswith(".npy"):
        return np.load(path)
    with Image.open(path) as img:
        img = img if img.mode == "L" else img.convert("RGB")
        arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    if len({a.shape[-1] for a in arrays}) > 1:  # grey and colour mixed: colour wins
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    return as_uint8_batch(np.stack(arrays))


def load_npz_images(path: str | Path) -> np.ndarray:
    with np.load(path) as z:
        keys = list(z.keys())
        for k in ("images", "x", "arr_0"):
            if k in keys:
                return z[k]
        if len(keys) == 1:
            return z[keys[0]]
    raise KeyError(f"{path}: no image array found (keys {keys}); store images under 'images'")


def _read_named(path: str) -> np.ndarray:
    """read_image, with the file named when it cannot be decoded."""
    try:
        return read_image(path)
    except decode_errors() as err:
        raise CorruptDataError(f"{path}: cannot decode ({type(err).__name__}: {err})") from err


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header (or the .npy shape), without decoding the pixels."""
    if path.endswith(".npy"):
        shape = np.load(path, mmap_mode="r").shape
        return int(shape[1]), int(shape[0])
    with Image.open(path) as img:
        return img.size


def mixed_sizes_error(folder: Path, files: list[str], show: int = 3) -> ValueError:
    """The error for a folder whose images differ in size: every size found, with its count and
    example files (most common size first)."""
    by_size: dict[tuple[int, int], list[str]] = {}
    for f in files:
        by_size.setdefault(_image_size(f), []).append(f)
    parts = []
    for (w, h), group in sorted(by_size.items(), key=lambda kv: -len(kv[1])):
        examples = ", ".join(os.path.relpath(f, folder) for f in group[:show])
        more = ", ..." if len(group) > show else ""
        parts.append(f"  {w}x{h}: {len(group)} file{'s' if len(group) != 1 else ''} ({examples}{more})")
    return ValueError(
        f"{folder}: images of {len(by_size)} different sizes:\n" + "\n".join(parts) + "\n"
        "One Fréchet distance compares images of one size: remove the odd ones (e.g. a sample grid saved "
        "next to the samples) or resize them all."
    )


def iter_images(source, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Yield uint8 batches [B, C, H, W] from any :data:`ImageSource` except statistics. A folder
    must hold images of one size (ValueError listing the sizes and example files otherwise)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = list_image_files(path)
            if not files:
                raise FileNotFoundError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {path}")
            size = None
            for i in range(0, len(files), batch_size):
                arrays = [_read_named(f) for f in files[i : i + batch_size]]
                size = size or arrays[0].shape[:2]
                if any(a.shape[:2] != size for a in arrays):  # only then read every header, for the message
                    raise mixed_sizes_error(path, files)
                yield _stack(arrays)
            return
        if path.suffix == ".npz" and path.is_file():
            source = load_npz_images(path)
        else:
            raise FileNotFoundError(f"image source {path} is neither a folder nor an .npz file")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        for i in range(0, len(source), batch_size):
            yield as_uint8_batch(source[i : i + batch_size])
        return
    if isinstance(source, Iterable):
        for batch in source:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            yield as_uint8_batch(batch)
        return
    raise TypeError(f"unsupported image source {type(source).__name__}")


def describe(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Stats):
        return f"stats:{source.source}"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"in-memory {type(source).__name__} {tuple(source.shape)}"
    return f"iterable {type(source).__name__}"


def images_sha256(source, batch_size: int = 256) -> tuple[str, int]:
    """sha256 of the uint8 pixels of an image source, in order (independent of batch size), and n."""
    h, n = hashlib.sha256(), 0
    for batch in iter_images(source, batch_size):
        h.update(batch.cpu().numpy().tobytes())
        n += len(batch)
    return h.hexdigest(), n


# ------------------------------------------------------------------------------------ statistics
@dataclass
class Stats:
    """Feature statistics of one image set: mean, covariance, n, and a feature subset for KID."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feats: np.ndarray | None = None
    extractor: str = ""
    metric: str = ""
    protocol: dict = field(default_factory=dict)
    source: str = ""
    source_sha256: str = ""

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (npz) atomically: a temporary name, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "version": STATS_VERSION,
            "n": self.n,
            "extractor": self.extractor,
            "metric": self.metric,
            "protocol": self.protocol,
            "source": self.source,
            "source_sha256": self.source_sha256,
        }
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(meta))}
        if self.feats is not None:
            arrays["feats"] = self.feats
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
            feats = z["feats"] if "feats" in z else None
            return cls(
                mu=z["mu"],
                sigma=z["sigma"],
                n=int(meta.get("n", -1)),
                feats=feats,
                extractor=meta.get("extractor", ""),
                metric=meta.get("metric", ""),
                protocol=meta.get("protocol", {}),
                source=meta.get("source", str(path)),
                source_sha256=meta.get("source_sha256", ""),
            )


def is_stats_file(source) -> bool:
    if not isinstance(source, (str, Path)) or Path(source).suffix != ".npz" or not Path(source).is_file():
        return False
    with np.load(source) as z:
        return "mu" in z and "sigma" in z


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
    kid_features: int = 10_000,
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
    kid_features: int = 10_000,
) -> Stats:
    """Statistics of an image source (or the source itself if it already is statistics)."""
    if isinstance(source, Stats):
        return source
    if is_stats_file(source):
        return Stats.load(source)
    feats, sha = extract_features(source, extractor, batch_size, progress, max_items)
    return stats_from_features(feats, extractor, describe(source), sha, kid_features)


# ------------------------------------------------------------------------------------- distances
def fd(a: Stats, b: Stats) -> float:
    """Fréchet distance between two Gaussian fits (clean-fid's ``frechet_distance``).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})  (Heusel et al. 2017, arXiv 1706.08500).
    """
    for s in (a, b):
        if 0 <= s.n < 2:  # statistics made elsewhere (n = -1: a file without the count)
            raise ValueError(f"{s.source or 'statistics'}: n = {s.n}; a Fréchet distance needs n >= 2 "
                             "per set")
    try:
        return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
    except TypeError as err:  # SciPy >= 1.18 dropped sqrtm's ``disp`` argument that clean-fid passes
        if "disp" not in str(err):
            raise
        return _frechet_distance_scipy(a.mu, a.sigma, b.mu, b.sigma)


def _frechet_distance_scipy(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The same formula and the same near-singular fallback as clean-fid, on current SciPy."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the Fréchet distance")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@contextlib.contextmanager
def _numpy_seed(seed: int):
    """clean-fid's KID draws subsets from numpy's global RNG; seed it, then restore the caller's."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def kid(
    a: Stats, b: Stats, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float | None:
    """KID by clean-fid's ``kernel_distance`` (subset average, fixed seed); None without features."""
    if a.feats is None or b.feats is None or min(len(a.feats), len(b.feats)) < 2:
        return None
    with _numpy_seed(seed):
        return kernel_distance(
            a.feats.astype(np.float64),
            b.feats.astype(np.float64),
            num_subsets=num_subsets,
            max_subset_size=max_subset_size,
        )


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
    """Fréchet distance (and KID) between two image sources in one feature space.

    Returns ``{"metric": "fid" | "fd_<name>", "value", "kid", "n_a", "n_b", "protocol"}``."""
    ext = build_extractor(features, device=device, weights=weights, mode=mode, allow_download=allow_download)
    sa = compute_stats(a, ext, batch_size, progress)
    sb = compute_stats(b, ext, batch_size, progress)
    for s, src in ((sa, a), (sb, b)):
        if s.extractor and s.extractor != ext.key():
            raise ValueError(
                f"statistics {describe(src)} were computed with features {s.extractor!r}, not {ext.key()!r}"
            )
    return result(ext, sa, sb, with_kid, describe(a), describe(b))


def result(
    ext: FeatureExtractor, sa: Stats, sb: Stats, with_kid: bool = True, name_a: str = "", name_b: str = ""
) -> dict:
    """The JSON-ready record of one comparison: value, KID, both n and the protocol."""
    return {
        "metric": ext.metric,
        "value": fd(sa, sb),
        "kid": kid(sa, sb) if with_kid else None,
        "n_a": sa.n,
        "n_b": sb.n,
        "protocol": {
            **ext.protocol(),
            "a": name_a or sa.source,
            "b": name_b or sb.source,
            "a_sha256": sa.source_sha256,
            "b_sha256": sb.source_sha256,
            "kid": "clean-fid kernel_distance, 100 subsets of <= 1000, numpy seed 0",
        },
    }


# ---------------------------------------------------------------------------- reference statistics
def dataset_images(dataset, batch_size: int = 500) -> Iterator[torch.Tensor]:
    """uint8 batches of a toolkit dataset (items ``(x in [-1, 1], label)``), in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for x, _ in loader:
        yield float_to_uint8(x)


def reference_path(
    dataset: str,
    split: str,
    image_size: int,
    extractor: FeatureExtractor,
    max_items: int | None = None,
    cache: str | Path | None = None,
) -> Path:
    root = Path(cache) if cache is not None else cache_dir() / "stats"
    n = f"_n{max_items}" if max_items else ""
    return root / f"{dataset}_{split}_{image_size}px_{extractor.key()}{n}.npz"


def reference_stats(
    dataset: str,
    extractor: FeatureExtractor,
    split: str = "train",
    image_size: int | None = None,
    root: str | None = None,
    max_items: int | None = None,
    cache: str | Path | None = None,
    refresh: bool = False,
    verify: bool = False,
    progress: bool = False,
) -> Stats:
    """Statistics of a toolkit dataset split in one feature space, computed once and cached.

    The cache file records the sha256 of the uint8 images it was computed from; ``verify=True``
    re-reads the dataset, recomputes that checksum and recomputes the statistics on a mismatch."""
    from difftools.data import build_dataset

    ds = build_dataset(dataset, root=root, split=split, image_size=image_size)
    size = ds.info.image_size
    path = reference_path(dataset, split, size, extractor, max_items, cache)
    source = f"dataset:{dataset}/{split}/{size}px" + (f"/first{max_items}" if max_items else "")
    if path.is_file() and not refresh:
        stats = Stats.load(path)
        fresh = stats.extractor == extractor.key() and stats.source == source
        if fresh and verify:
            limited = _first(dataset_images(ds), max_items)
            fresh = images_sha256(limited)[0] == stats.source_sha256
        if fresh:
            return stats
    feats, sha = extract_features(_first(dataset_images(ds), max_items), extractor, progress=progress)
    stats = stats_from_features(feats, extractor, source, sha)
    stats.save(path)
    return stats


def _first(batches: Iterator[torch.Tensor], n: int | None) -> Iterator[torch.Tensor]:
    seen = 0
    for b in batches:
        if n is not None:
            b = b[: n - seen]
        if len(b):
            yield b
        seen += len(b)
        if n is not None and seen >= n:
            return
