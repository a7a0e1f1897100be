"""Gaussian duality of masked diffusion ("Latent Shadows", arXiv 2602.00792).

A Gaussian latent over the one-hot vector of each token,
    w_t = a_t e_x0 + s_t eps,   eps ~ N(0, I_V),
is projected to the masked state by maximum-value index preservation: z_t = x0 if argmax_j w_t[j] = x0,
else [MASK]. Dividing by s_t, the token is visible iff r_t + eps_x0 > max_{j != x0} eps_j with the
SNR ratio r_t = a_t / s_t, i.e. iff r_t > tau where tau = max_{j != x0} eps_j - eps_x0 is a per-token
threshold fixed by eps. Hence the keep-probability is the 1-D integral
    p_V(r) = P(tau < r) = int phi(z) Phi(z + r)^(V-1) dz,
increasing in r, from 0 (r -> -inf) through 1/V (r = 0) to 1 (r -> +inf). Choosing r_t = p_V^{-1}(alpha_t)
makes the projected process exactly the masked process with schedule alpha_t. We allow r < 0 (a_t < 0)
so that alpha_t < 1/V is reachable, and use the variance-preserving pair a_t = r_t / sqrt(1 + r_t^2),
s_t = 1 / sqrt(1 + r_t^2) (only the ratio matters for the projection).

Coupling: with ONE eps shared by times s < t, r_s >= r_t, so every token visible at t is visible at s
(visible(t) is a subset of visible(s)) and each marginal is still q(z | x0): a deterministic, monotone
pair (z_t, z_s) given (x0, eps), with no ODE solve. Note: since tau has a continuous law, u = p_V(tau)
is uniform on (0, 1) and "visible iff u < alpha_t" is the same coupling written with a shared uniform;
the Gaussian view is what links it to the Gaussian-diffusion / consistency-distillation machinery.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.special import ndtr

R_RANGE = (-12.0, 14.0)
R_POINTS = 2601
Z_GRID = np.linspace(-9.0, 9.0, 3601)


def keep_probability(snr, vocab_size: int) -> torch.Tensor:
    """p_V(r) = int phi(z) Phi(z + r)^(V-1) dz by the trapezoid rule on z in [-9, 9] (float64)."""
    if vocab_size < 2:
        raise ValueError(f"keep_probability: vocab_size must be >= 2, got {vocab_size}")
    r = np.atleast_1d(np.asarray(snr, dtype=np.float64))
    phi = np.exp(-0.5 * Z_GRID**2) / np.sqrt(2.0 * np.pi)
    out = np.empty_like(r)
    for i in range(0, len(r), 256):  # chunks keep the [chunk, grid] table small
        cdf = ndtr(Z_GRID[None, :] + r[i : i + 256, None])
        out[i : i + 256] = np.trapezoid(phi * cdf ** (vocab_size - 1), Z_GRID, axis=1)
    return torch.from_numpy(out.reshape(np.shape(snr)))


@functools.lru_cache(maxsize=16)
def _table(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.linspace(*R_RANGE, R_POINTS)
    p = keep_probability(r, vocab_size).numpy()
    keep = np.concatenate([[True], np.diff(p) > 0])  # drop the flat, saturated ends for np.interp
    return p[keep], r[keep]


def snr_for_keep(alpha, vocab_size: int) -> torch.Tensor:
    """r with p_V(r) = alpha (monotone inverse by interpolation of a cached table); alpha = 0 -> -inf,
    alpha = 1 -> +inf, and values beyond the table's range map to +-inf as well."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    if ((alpha < 0) | (alpha > 1)).any():
        raise ValueError("snr_for_keep: alpha must lie in [0, 1]")
    p, r = _table(vocab_size)
    a = alpha.numpy()
    out = np.interp(a, p, r)
    out = np.where(a <= p[0], -np.inf, np.where(a >= p[-1], np.inf, out))
    return torch.from_numpy(np.asarray(out, dtype=np.float64))


class GaussianDuality:
    """The Gaussian latent calibrated to a :class:`~difftools.discrete.masked.MaskedDiffusion`."""

    def __init__(self, process):
        self.process = process
        self.vocab_size, self.mask_id = process.vocab_size, process.mask_id

    def snr(self, t) -> torch.Tensor:
        """r_t = a_t / s_t = p_V^{-1}(alpha_t) (float64, on t's device; the table lookup runs on the CPU)."""
        t = torch.as_tensor(t)
        alpha = self.process.alpha(t.cpu()).clamp(0.0, 1.0)
        return snr_for_keep(alpha, self.vocab_size).to(t.device)

    def coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) with a_t^2 + s_t^2 = 1 and a_t / s_t = r_t (a = +-1, s = 0 at r = +-inf)."""
        r = self.snr(t)
        finite = torch.isfinite(r)
        rf = torch.where(finite, r, torch.zeros_like(r))
        s = torch.where(finite, 1.0 / torch.sqrt(1.0 + rf**2), torch.zeros_like(r))
        a = torch.where(finite, rf * s, torch.sign(r))
        return a, s

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((*x0.shape, self.vocab_size), generator=generator, dtype=torch.float64,
                           device=x0.device)

    def latent(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """w_t = a_t e_x0 + s_t eps, [B, L, V] (t scalar or [B])."""
        a, s = (c.reshape(-1, *([1] * x0.ndim)) for c in self.coefficients(t))
        onehot = torch.nn.functional.one_hot(x0, self.vocab_size).to(torch.float64)
        return a * onehot + s * eps

    def project(self, w: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Maximum-value index preservation: x0 where argmax w = x0, else [MASK]."""
        visible = w.argmax(-1) == x0
        return torch.where(visible, x0, torch.full_like(x0, self.mask_id))

    @staticmethod
    def thresholds(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """tau = max_{j != x0} eps_j - eps_x0: the token is visible exactly when r_t > tau."""
        own = eps.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        others = eps.scatter(-1, x0.unsqueeze(-1), float("-inf")).amax(-1)
        return others - own

    def mask(self, x0: torch.Tensor, t, tau: torch.Tensor) -> torch.Tensor:
        """z_t from the thresholds (equal to project(latent(x0, t, eps), x0), without the [.., V] latent)."""
        r = self.snr(t).reshape(-1, *([1] * (x0.ndim - 1))).to(x0.device)
        return torch.where(r > tau, x0, torch.full_like(x0, self.mask_id))

    def coupled_pair(self, x0: torch.Tensor, t, s, generator: torch.Generator | None = None):
        """(z_t, z_s) from ONE shared eps: visible(z_t) is a subset of visible(z_s) for s <= t."""
        tau = self.thresholds(x0, self.noise(x0, generator))
        return self.mask(x0, t, tau), self.mask(x0, s, tau)


def independent_pair(process, x0: torch.Tensor, t, s, generator: torch.Generator | None = None):
    """Stochastic-pair baseline: z_t and z_s masked independently from the same x0."""
    return process.mask(x0, t, generator), process.mask(x0, s, generator)
