"""Masked (absorbing-state) discrete diffusion: forward masking and the MDLM ELBO loss.

Forward process (MDLM, Sahoo et al., arXiv 2406.07524; Shi et al., arXiv 2406.04329): each token of
x0 independently stays itself with probability alpha_t and becomes [MASK] (id V) otherwise,
    q(z_t | x0) = alpha_t * onehot(x0) + (1 - alpha_t) * onehot([MASK]),   t = 0 data, t = 1 all masked.
Schedules: linear alpha_t = 1 - t, cosine alpha_t = cos(pi t / 2).

Loss (continuous-time NELBO with the "carry-over" parameterisation, x_theta puts no mass on [MASK]
and copies visible tokens):
    L = E_t E_{z_t} [ w(t) * sum_{l: z_t^l = MASK} -log p_theta(x0^l | z_t) ] / L,
    w(t) = -alpha_t' / (1 - alpha_t)   (w(t) = 1/t for the linear schedule);
normalised per token, so it is an upper bound on nats/token.

The samplers (ancestral, and the Gaussian duality's deterministic one) are in
:mod:`difftools.discrete.sampling`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCHEDULES = ("linear", "cosine")


class MaskedDiffusion:
    """Absorbing process over ``vocab_size`` real tokens; ``mask_id = vocab_size``."""

    def __init__(self, vocab_size: int, schedule: str = "linear", t_min: float = 1e-3):
        if schedule not in SCHEDULES:
            raise ValueError(f"MaskedDiffusion: unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        self.vocab_size, self.mask_id, self.schedule, self.t_min = vocab_size, vocab_size, schedule, t_min

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1.0 - t if self.schedule == "linear" else torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.schedule == "linear":
            return -torch.ones_like(t)
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight -alpha_t' / (1 - alpha_t)."""
        return -self.d_alpha(t) / (1.0 - self.alpha(t))

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stratified ("low-discrepancy", as in MDLM) t in [t_min, 1]: lower-variance ELBO estimate
        (on the generator's device)."""
        device = generator.device if generator is not None else None
        shift = torch.rand((), generator=generator, dtype=torch.float64, device=device)
        u = (torch.arange(n, dtype=torch.float64, device=device) + shift) / n
        return self.t_min + (1.0 - self.t_min) * u

    def mask(
        self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z_t ~ q(z_t | x0): keep each token with probability alpha_t (t: scalar or [B]; draws on x0's
        device, which must be the generator's)."""
        alpha = self.alpha(t).reshape(-1, *([1] * (x0.ndim - 1))).to(x0.device)
        keep = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x0.device) < alpha
        return torch.where(keep, x0, torch.full_like(x0, self.mask_id))

    def loss(
        self, logits: torch.Tensor, x0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """MDLM NELBO per token (see module docstring); logits [B, L, V] over real tokens only."""
        if logits.shape != (*x0.shape, self.vocab_size):
            raise ValueError(f"loss: logits {tuple(logits.shape)} != {(*x0.shape, self.vocab_size)}")
        nll = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")
        masked = (z_t == self.mask_id).to(nll.dtype)
        per_seq = (nll * masked).sum(1) / x0.shape[1]
        return (self.weight(t).to(nll.dtype) * per_seq).mean()

    def corrupt(
        self, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, z_t): stratified times and the masked batch (on x0's device, the generator's)."""
        t = self.sample_t(x0.shape[0], generator)
        return t, self.mask(x0, t, generator)

    def training_loss(
        self, model, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The NELBO of one batch; noise drawn on the CPU, the network run on its own device."""
        t, z_t = self.corrupt(x0, generator)
        device = next(model.parameters()).device
        x0, z_t, t = x0.to(device), z_t.to(device), t.to(device)
        return self.loss(model(z_t), x0, z_t, t)
