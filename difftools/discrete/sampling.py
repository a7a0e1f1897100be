"""Samplers of masked diffusion: the ancestral (stochastic) sampler and the Gaussian duality's
deterministic sampler, plus the partial paths z_t -> z_s that distillation targets are built on.

Both run N steps on a grid 1 = t_0 > ... > t_N = 0 from all-[MASK], one network call per step
(NFE = N, also on steps that reveal nothing: no caching, to keep NFE honest); at s = t_N = 0
every position is revealed, so no [MASK] survives.

**Ancestral** (MDLM, arXiv 2406.07524): at step t -> s each masked position is revealed with
probability (alpha_s - alpha_t) / (1 - alpha_t), its token drawn from p_theta(. | z_t).

**Deterministic** (the duality of "Latent Shadows", arXiv 2602.00792; :mod:`.duality`): ONE draw
per sequence, :class:`RevealNoise`, fixes
  * each position's unmasking threshold tau_l = max_{j != c} eps_lj - eps_lc (eps_l ~ N(0, I_V)):
    the position is visible at time t iff r_t > tau_l with r_t = p_V^{-1}(alpha_t) (the SNR ratio
    of the calibrated Gaussian latent), so on the grid it is revealed at the one step i with
    r_{t_i} <= tau_l < r_{t_{i+1}}. Sampling from all-[MASK], c = 0 (tau's law does not depend
    on c); on a path from a data-built z_t, c is the data token, which makes the path start
    exactly at the z_t the duality built;
  * its token, by Gumbel-max with a Gumbel vector g_l fixed for the sequence,
    x_l = argmax_j (logit_j(z_{t_i}) + g_lj), read at the step that reveals l.
Given the draw, the sequence is a deterministic function of the network: the same draw gives the
same sequence, so a teacher's k-step path from z_t is a function of (z_t, draw).
Law (ours, checked in tests/test_discrete.py): p_V(tau) is uniform on (0, 1), so
P(revealed in (t, s] | masked at t) = (alpha_s - alpha_t) / (1 - alpha_t), and Gumbel-max draws
from softmax(logits), each position's g_l being used once; the deterministic sampler therefore
has the same law as the ancestral one. The gain is the fixed noise -> sequence map, not another
distribution of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftools.discrete.duality import GaussianDuality
from difftools.discrete.masked import MaskedDiffusion

SAMPLERS = ("ancestral", "deterministic")


@dataclass
class RevealNoise:
    """The draw that fixes a deterministic path: thresholds ``tau`` [B, L] (float64) and Gumbel
    noise ``gumbel`` [B, L, V] (float64)."""

    tau: torch.Tensor
    gumbel: torch.Tensor

    @classmethod
    def draw(cls, shape: tuple[int, int], vocab_size: int, generator: torch.Generator | None = None,
             x0: torch.Tensor | None = None) -> RevealNoise:
        """One draw for ``shape`` = (B, L) sequences (on the generator's device): eps ~ N(0, I_V) per
        position gives tau (against token ``x0``, or token 0 when sampling from all-[MASK]); then
        U(0, 1) draws give g = -log(-log U)."""
        device = generator.device if generator is not None else None
        eps = torch.randn((*shape, vocab_size), generator=generator, dtype=torch.float64, device=device)
        tokens = x0.to(eps.device) if x0 is not None else torch.zeros(shape, dtype=torch.long, device=device)
        tau = GaussianDuality.thresholds(tokens, eps)
        u = torch.rand((*shape, vocab_size), generator=generator, dtype=torch.float64, device=device)
        return cls(tau=tau, gumbel=-torch.log(-torch.log(u)))

    def to(self, device) -> RevealNoise:
        return RevealNoise(self.tau.to(device), self.gumbel.to(device))


def step_times(t, s, steps: int) -> torch.Tensor:
    """Uniform sub-grid from t to s, [steps + 1, B] (float64); t, s scalars or [B]."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).to(t.device)
    frac = torch.arange(steps + 1, dtype=torch.float64, device=t.device).unsqueeze(1) / steps
    return t + (s - t) * frac


def deterministic_step(logits: torch.Tensor, z: torch.Tensor, r_next: torch.Tensor, noise: RevealNoise,
                       mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z at time t -> z at time s: reveal the masked positions with tau < r_s ([B] SNR ratios),
    each with its Gumbel-max token. Returns (z_s, revealed mask)."""
    reveal = (z == mask_id) & (noise.tau < r_next.to(z.device).unsqueeze(1))
    tokens = (logits.double() + noise.gumbel).argmax(-1)
    return torch.where(reveal, tokens, z), reveal


def ancestral_step(probs: torch.Tensor, z: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor,
                   mask_id: int, generator: torch.Generator | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """z at time t -> z at time s, stochastically: tokens from ``probs`` [B, L, V] (float64, on the
    generator's device), reveals with probability (alpha_s - alpha_t) / (1 - alpha_t) ([B] or
    scalar). Returns (z_s, revealed mask) on z's device."""
    device, here = z.device, probs.device
    z = z.to(here)
    x = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(z.shape)
    p_reveal = ((alpha_s - alpha_t) / (1.0 - alpha_t)).reshape(-1, 1).to(here)
    u = torch.rand(z.shape, generator=generator, dtype=torch.float64, device=here)
    reveal = (z == mask_id) & (u < p_reveal)
    return torch.where(reveal, x, z).to(device), reveal.to(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def ancestral_sample(
    model,
    process: MaskedDiffusion,
    batch: int,
    seq_len: int,
    steps: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """N-step ancestral sampler on the uniform grid t_i = 1 - i/N; returns (ids [B, L] on the CPU,
    nfe). Random draws on the CPU from ``generator``."""
    if steps < 1:
        raise ValueError(f"ancestral_sample: steps must be >= 1, got {steps}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    device = _device(model)
    z = torch.full((batch, seq_len), process.mask_id, dtype=torch.long)
    for i in range(steps):
        logits = model(z.to(device)).cpu()
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        z, _ = ancestral_step(probs, z, process.alpha(ts[i]), process.alpha(ts[i + 1]), process.mask_id,
                              generator)
    return z, steps


@torch.no_grad()
def deterministic_sample(model, process: MaskedDiffusion, noise: RevealNoise, steps: int,
                         ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """N-step deterministic sampler on t_i = 1 - i/N from the draw ``noise`` (one per sequence,
    :meth:`RevealNoise.draw`). Returns (ids [B, L] on the CPU, nfe, reveal_step [B, L]: the step
    index i whose update t_i -> t_{i+1} revealed the position)."""
    if steps < 1:
        raise ValueError(f"deterministic_sample: steps must be >= 1, got {steps}")
    device = _device(model)
    noise = noise.to(device)
    r = GaussianDuality(process).snr(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))
    z = torch.full(noise.tau.shape, process.mask_id, dtype=torch.long, device=device)
    reveal_step = torch.full(noise.tau.shape, -1, dtype=torch.long, device=device)
    for i in range(steps):
        z, revealed = deterministic_step(model(z), z, r[i + 1].expand(z.shape[0]), noise, process.mask_id)
        reveal_step[revealed] = i
    return z.cpu(), steps, reveal_step.cpu()


def sample(model, process: MaskedDiffusion, sampler: str, batch: int, seq_len: int, steps: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch`` sequences with ``sampler`` (ancestral | deterministic) from ``generator``."""
    if sampler == "ancestral":
        return ancestral_sample(model, process, batch, seq_len, steps, generator)[0]
    if sampler == "deterministic":
        noise = RevealNoise.draw((batch, seq_len), process.vocab_size, generator)
        return deterministic_sample(model, process, noise, steps)[0]
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
