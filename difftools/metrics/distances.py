"""Distances between two sets of feature statistics, on clean-fid's math.

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))     (Heusel et al. 2017, arXiv 1706.08500)
    KID = unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3        (Bińkowski et al. 2018, arXiv 1801.01401)

Both are clean-fid's own ``frechet_distance`` and ``kernel_distance`` (arXiv 2104.11222); a
:func:`result` record carries the value with both n and the protocol.
"""

from __future__ import annotations

import contextlib

import numpy as np
from cleanfid.fid import frechet_distance, kernel_distance
from scipy import linalg

from difftools.metrics.features import FeatureExtractor
from difftools.metrics.stats import Stats

KID_PROTOCOL = "clean-fid kernel_distance, 100 subsets of <= 1000, numpy seed 0"


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
    """KID by clean-fid's ``kernel_distance`` (subset average, fixed seed); None without features
    (e.g. statistics saved without them)."""
    if a.feats is None or b.feats is None or min(len(a.feats), len(b.feats)) < 2:
        return None
    with _numpy_seed(seed):
        return kernel_distance(
            a.feats.astype(np.float64),
            b.feats.astype(np.float64),
            num_subsets=num_subsets,
            max_subset_size=max_subset_size,
        )


def result(
    ext: FeatureExtractor, sa: Stats, sb: Stats, with_kid: bool = True, name_a: str = "", name_b: str = ""
) -> dict:
    """The JSON-ready record of one comparison: ``{"metric": "fid" | "fd_<name>", "value", "kid",
    "n_a", "n_b", "protocol"}``."""
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
            "kid": KID_PROTOCOL,
        },
    }
