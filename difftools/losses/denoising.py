"""The denoising (score-matching) loss for every process and prediction type.

    t ~ p(t),  eps ~ N(0, I),  x_t = alpha(t) x0 + sigma(t) eps
    L = E[ w(t) * mean_pixels (net(x_t, t, y) - target(x0, eps, t))^2 ]

with ``target = process.target(x0, eps, t, prediction)``: eps (Ho et al. 2020, arXiv 2006.11239),
x0, v = alpha eps - sigma x0 (Salimans & Ho 2022, arXiv 2202.00512) or the flow velocity
dx_t/dt = alpha' x0 + sigma' eps (Lipman et al. 2022, arXiv 2210.02747; Liu et al. 2022,
arXiv 2209.03003). t is drawn by ``process.sample_t``: uniform, logit-normal (Esser et al. 2024,
arXiv 2403.03206) or EDM's log-normal (Karras et al. 2022, arXiv 2206.00364).

Several processes (DDP): each holds rows ``[r b, (r + 1) b)`` of a global batch of ``w b``. With
:meth:`DenoisingLoss.hold_rows` set, every process draws t and eps for the whole global batch from
one generator seeded alike on every process and keeps its own rows, so sample j of a global batch
gets the same t and eps whatever the number of processes (and a resumed run may change it). This
costs w times the random numbers of one process' batch (for w = 8 and 256 latents of 4x32x32, 8M
normals per step: microseconds on a GPU).

Weightings are stated in x0 space. A prediction-space error relates to the x0 error by a factor:
||P_hat - P||^2 = c_P(t)^2 ||x0_hat - x0||^2 with c_x0 = 1, c_eps^2 = SNR, c_v = (alpha^2 + sigma^2) / sigma
and c_flow = (alpha sigma' - sigma alpha') / sigma. A weighting with x0-space weight W(t) multiplies
the prediction-space MSE by W(t) / c_P(t)^2:

* ``none``: w = 1 (the plain MSE of the chosen prediction type).
* ``min_snr``: W = min(SNR, gamma), gamma = 5 (Hang et al. 2023, arXiv 2303.09556).
* ``edm``: W = (s^2 + sigma_data^2) / (s sigma_data)^2 with s = sigma / alpha (EDM's lambda(sigma)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from samplers.process import PREDICTIONS, NoiseProcess

WEIGHTINGS = ("none", "min_snr", "edm")
T_DISTRIBUTIONS = ("uniform", "logit_normal", "edm_lognormal")


class DenoisingTerms(NamedTuple):
    """Everything one denoising forward produced (for losses that build on it)."""

    loss: torch.Tensor          # scalar, weighted
    per_sample: torch.Tensor    # [B] unweighted MSE per sample
    pred: torch.Tensor
    target: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor


class DenoisingLoss(nn.Module):
    """``loss_fn(model, x0, y=None, generator=None) -> (loss, logs)``; see the module docstring.

    Args:
        process: the noise process (alpha, sigma, sample_t).
        prediction: what the network outputs: ``eps``, ``x0``, ``v`` or ``flow``.
        t_distribution: ``uniform``, ``logit_normal`` or ``edm_lognormal``.
        weighting: ``none``, ``min_snr`` or ``edm``.
        t_min, t_max: range of training times (samples are clamped into it).
        t_mean, t_std: location / scale of the logit-normal or log-normal (None = the defaults
            0 / 1 and -1.2 / 1.2).
        min_snr_gamma: gamma of ``min_snr``.
        sigma_data: data standard deviation of the ``edm`` weighting.
    """

    def __init__(self, process: NoiseProcess, prediction: str = "flow", t_distribution: str = "uniform",
                 weighting: str = "none", t_min: float = 1e-5, t_max: float = 1.0,
                 t_mean: float | None = None, t_std: float | None = None, min_snr_gamma: float = 5.0,
                 sigma_data: float = 0.5):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"loss.prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if t_distribution not in T_DISTRIBUTIONS:
            raise ValueError(f"loss.t_distribution must be one of {T_DISTRIBUTIONS}, got {t_distribution!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.process, self.prediction = process, prediction
        self.t_distribution, self.weighting = t_distribution, weighting
        self.t_min, self.t_max, self.t_mean, self.t_std = float(t_min), float(t_max), t_mean, t_std
        self.min_snr_gamma, self.sigma_data = float(min_snr_gamma), float(sigma_data)
        self.rank, self.world_size = 0, 1

    def hold_rows(self, rank: int, world_size: int) -> DenoisingLoss:
        """This process holds rows ``[rank b, (rank + 1) b)`` of each global batch of ``world_size b``:
        draw t and eps for the global batch and keep those rows (module docstring). The generator
        passed to :meth:`forward` must then be seeded alike on every process."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        self.rank, self.world_size = int(rank), int(world_size)
        return self

    def _own_rows(self, draw, b: int) -> torch.Tensor:
        """``draw(n)`` for the global batch, n = world_size b, cut to this process's b rows."""
        if self.world_size == 1:
            return draw(b)
        return draw(b * self.world_size)[self.rank * b:(self.rank + 1) * b]

    def sample_t(self, n: int, device, generator=None) -> torch.Tensor:
        return self.process.sample_t(n, self.t_distribution, generator=generator, device=device,
                                     t_min=self.t_min, t_max=self.t_max, mean=self.t_mean, std=self.t_std)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight w(t) of the prediction-space MSE, [B] float32."""
        if self.weighting == "none":
            return torch.ones_like(t, dtype=torch.float32)
        t64 = t.double()
        a, s = self.process.alpha(t64), self.process.sigma(t64)
        snr = (a / s) ** 2
        if self.weighting == "min_snr":
            w_x0 = snr.clamp(max=self.min_snr_gamma)
        else:  # edm: lambda(sigma) of EDM with sigma = s / a, the noise level of x_t / alpha
            ratio = s / a
            w_x0 = (ratio**2 + self.sigma_data**2) / (ratio * self.sigma_data) ** 2
        return (w_x0 / self.x0_scale_sq(t64, a, s)).float()

    def x0_scale_sq(self, t: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """c_P(t)^2 with ||P_hat - P||^2 = c_P^2 ||x0_hat - x0||^2 at fixed x_t."""
        if self.prediction == "x0":
            return torch.ones_like(a)
        if self.prediction == "eps":
            return (a / s) ** 2
        if self.prediction == "v":
            return ((a * a + s * s) / s) ** 2
        det = a * self.process.d_sigma(t) - s * self.process.d_alpha(t)
        return (det / s) ** 2

    def terms(self, model, x0: torch.Tensor, y=None, generator=None) -> DenoisingTerms:
        """One noised forward: draw t and eps, build x_t, run the model, score it."""
        b, shape = x0.shape[0], tuple(x0.shape[1:])
        t = self._own_rows(lambda n: self.sample_t(n, x0.device, generator), b)
        eps = self._own_rows(
            lambda n: torch.randn((n, *shape), generator=generator, device=x0.device, dtype=x0.dtype), b)
        x_t = self.process.marginal(x0, eps, t)
        pred = model(x_t, t, y)
        target = self.process.target(x0, eps, t, self.prediction)
        if pred.shape != target.shape:
            raise ValueError(f"model output {tuple(pred.shape)} does not match the {self.prediction} target "
                             f"{tuple(target.shape)} (learn_sigma models are not supported by this loss)")
        # fp32 reduction: under bf16 autocast the prediction is bf16 and a bf16 mean loses digits
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        loss = (self.weight(t).to(per_sample.device) * per_sample).mean()
        return DenoisingTerms(loss, per_sample, pred, target, x_t, t, eps)

    def forward(self, model, x0: torch.Tensor, y=None, generator=None):
        terms = self.terms(model, x0, y, generator)
        return terms.loss, {"loss_mse": terms.per_sample.detach().mean()}

    def extra_repr(self) -> str:
        rows = f", rank={self.rank}, world_size={self.world_size}" if self.world_size > 1 else ""
        return (f"process={self.process!r}, prediction={self.prediction!r}, "
                f"t_distribution={self.t_distribution!r}, weighting={self.weighting!r}{rows}")

