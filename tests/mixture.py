"""Gaussian-mixture accuracy harness: an exact denoiser and an exact probability-flow ODE solution.

Shared by the sampler tests (H3) and the guidance tests (H4). Data are a mixture of K Gaussians
with diagonal covariances in R^D,

    p(x0) = sum_k w_k N(x0; mu_k, diag(s_k^2)).

Under any process x_t = alpha x0 + sigma eps the marginal of x_t is again a mixture,
x_t | k ~ N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)), so the posterior mean is closed-form:

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)),
    r_k(x_t) = w_k N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2) / sum_j (...)     (responsibilities).

That is the exact x0-prediction (denoiser) D(x_t, t) that a perfectly trained network would give.
The class-conditional variant has one component per class: with label y the denoiser uses only
component y (label == num_classes, the null class, or y=None means the unconditional mixture).

``perturbation`` adds a controlled, smooth, noise-level-dependent error to the denoiser
(a model "approximation error", as analysed by DualFast, arXiv 2506.13058):

    D_pert(x_t, t) = D(x_t, t) + scale * alpha(t)^power * tanh(A x_t + b),

which vanishes at high noise (alpha -> 0) and grows toward the data end, like a real network's
error. The reference ("truth") is always the exact-denoiser ODE solution, integrated with scipy's
DOP853 at tight tolerances (``ode_reference``).

Everything is computed in float64 on CPU; inputs of shape [B, D] or [B, C, H, W] (D = C*H*W).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from difftools.process import NoiseProcess, as_time, broadcast_to
from samplers.model import ModelFn


class GaussianMixture:
    """A diagonal Gaussian mixture with an exact posterior-mean denoiser.

    Args:
        means: [K, D] component means.
        stds: [K, D] (or [K] / scalar) component standard deviations.
        weights: [K] mixture weights (normalised here); default uniform.
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k, d = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 1 and stds.numel() == k:
            stds = stds.reshape(k, 1)
        self.stds = stds.expand(k, d).clone()
        w = (
            torch.ones(k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        self.weights = w / w.sum()
        self.num_components, self.dim = k, d

    @property
    def num_classes(self) -> int:
        """Class-conditional view: one class per component."""
        return self.num_components

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator | None = None, labels=None):
        """Draw n data points; returns (x0 [n, D], labels [n])."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        labels = torch.as_tensor(labels, dtype=torch.long)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels] * z, labels

    # ------------------------------------------------------------------ posterior
    def posterior_mean(self, x_t: torch.Tensor, alpha, sigma, y=None) -> torch.Tensor:
        """E[x0 | x_t] for x_t = alpha x0 + sigma eps (alpha, sigma scalars or [B]); float64.

        ``y``: optional [B] labels; label == num_classes (null class) means unconditional.
        """
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1).to(torch.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"mixture has dimension {self.dim}, input has {x.shape[1]}")
        a = broadcast_to(as_time(alpha).to(torch.float64), x)[..., None]  # [B,1,1] or scalar
        s = broadcast_to(as_time(sigma).to(torch.float64), x)[..., None]
        mu, var0 = self.means[None], self.stds[None] ** 2  # [1,K,D]
        var = a * a * var0 + s * s  # [B|1,K,D]
        diff = x[:, None, :] - a * mu  # [B,K,D]
        log_r = torch.log(self.weights)[None] - 0.5 * (torch.log(var) + diff * diff / var).sum(-1)  # [B,K]
        if y is not None:
            y = torch.as_tensor(y, device=x.device).long().reshape(-1)
            cond = y < self.num_components
            onehot = torch.zeros_like(log_r, dtype=torch.bool)
            onehot[cond, y[cond]] = True
            mask = torch.where(cond[:, None], onehot, torch.ones_like(onehot))
            log_r = log_r.masked_fill(~mask, -math.inf)
        r = torch.softmax(log_r, dim=1)  # [B,K]
        comp_mean = mu + a * var0 / var * diff  # [B,K,D]
        return (r[..., None] * comp_mean).sum(1).reshape(shape)

    # ------------------------------------------------------------------ as a network
    def denoiser(self, process: NoiseProcess, perturbation: dict | None = None):
        """A callable ``net(x_t, t, y=None) -> x0 estimate`` (prediction type ``x0``).

        ``perturbation=dict(scale=0.1, power=2.0, seed=0)`` adds
        scale * alpha(t)^power * tanh(A x_t + b) with a fixed random A [D, D] (unit-variance
        rows / sqrt(D)) and b [D]: a smooth model error that grows as t -> 0.
        """
        mixture = self

        pert = None
        if perturbation is not None:
            g = torch.Generator().manual_seed(int(perturbation.get("seed", 0)))
            mat = torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64) / math.sqrt(self.dim)
            bias = torch.randn(self.dim, generator=g, dtype=torch.float64)
            pert = (float(perturbation.get("scale", 0.1)), float(perturbation.get("power", 2.0)), mat, bias)

        def net(x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
            t64 = as_time(t).to(torch.float64)
            a, s = process.alpha(t64), process.sigma(t64)
            out = mixture.posterior_mean(x_t, a, s, y=y)
            if pert is not None:
                scale, power, mat, bias = pert
                flat = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
                err = torch.tanh(flat @ mat.T + bias) * broadcast_to(a.abs() ** power, flat) * scale
                out = out + err.reshape(x_t.shape)
            return out.to(x_t.dtype)

        return net

    def model_fn(
        self, process: NoiseProcess, perturbation: dict | None = None, prediction: str = "x0"
    ) -> ModelFn:
        """The exact (or perturbed) denoiser as a ModelFn of any prediction type.

        For prediction != "x0" the denoiser's x0 is converted into that type first, so the
        same function can be fed to solvers expecting eps / v / flow networks.
        """
        net = self.denoiser(process, perturbation)
        if prediction == "x0":
            return ModelFn(net, process, prediction="x0")

        def typed(x_t, t, y=None):
            x0 = net(x_t, t, y=y)
            return process.convert(x0, x_t, t, "x0", prediction)

        return ModelFn(typed, process, prediction=prediction)

    # ------------------------------------------------------------------ exact ODE
    def ode_reference(
        self,
        process: NoiseProcess,
        x_start: torch.Tensor,
        t_start: float,
        t_end: float,
        y=None,
        rtol: float = 1e-12,
        atol: float = 1e-12,
    ) -> torch.Tensor:
        """The probability-flow ODE solution x(t_end) from x(t_start) = x_start with the exact
        denoiser: dx/dt = alpha'(t) D + sigma'(t) (x - alpha D) / sigma   (scipy DOP853)."""
        shape = x_start.shape
        x0 = x_start.reshape(-1).to(torch.float64).numpy()

        def rhs(t, flat):
            x = torch.from_numpy(flat).reshape(shape)
            t64 = torch.tensor(t, dtype=torch.float64)
            a, s = process.alpha(t64), process.sigma(t64)
            d = self.posterior_mean(x, a, s, y=y)
            eps = (x - a * d) / s
            return (process.d_alpha(t64) * d + process.d_sigma(t64) * eps).reshape(-1).numpy()

        sol = solve_ivp(rhs, (float(t_start), float(t_end)), x0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape)


def make_mixture(
    dim: int = 2, num_components: int = 4, std: float = 0.3, radius: float = 1.5, seed: int = 0
) -> GaussianMixture:
    """A reproducible test mixture: means on a random sphere of ``radius``, stds around ``std``
    (each component and coordinate scaled by a factor in [0.6, 1.4]), random weights in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_components, dim, generator=g, dtype=torch.float64)
    means = radius * means / means.norm(dim=1, keepdim=True)
    stds = std * (0.6 + 0.8 * torch.rand(num_components, dim, generator=g, dtype=torch.float64))
    weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def make_class_mixture(
    num_classes: int = 10, dim: int = 2, std: float = 0.25, radius: float = 2.0, seed: int = 0
) -> GaussianMixture:
    """Class-conditional mixture: component k is class k (equal weights), means evenly spaced on a
    circle of ``radius`` in the first two coordinates (other coordinates small random offsets), so
    classes are well separated; use ``y`` in the denoiser to condition, y = num_classes (null
    class) for the unconditional mixture."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.arange(num_classes, dtype=torch.float64) / num_classes
    means = 0.2 * torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    means[:, 0], means[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
    stds = std * (0.8 + 0.4 * torch.rand(num_classes, dim, generator=g, dtype=torch.float64))
    return GaussianMixture(means, stds, None)
