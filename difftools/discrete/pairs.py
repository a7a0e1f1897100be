"""Training pairs of masked consistency distillation: (z_t, target) built from a data batch x0.

Times (Duo's distillation schedule, s-sahoo/duo ``algo.py`` ``Distillation.nll``, read only):
u ~ U[0, 1], t = min(t_min + (1 - t_min) u + dt, 1), s = t - dt. The clip puts probability ~dt on
t = 1 (all [MASK]), the state every sampler starts from.

Pairs (``PAIRS``):
  * ``trajectory`` -- the teacher's own deterministic path under the Gaussian duality: one draw
    (:class:`~difftools.discrete.sampling.RevealNoise`, thresholds against the data tokens) builds
    z_t from x0 exactly as the duality does (visible iff r_t > tau), then the teacher runs
    ``substeps`` deterministic sampler steps from z_t to s with the same thresholds and Gumbel
    noise: positions with r_t <= tau < r_s are revealed with the teacher's Gumbel-max tokens.
    A function of (x0, draw, teacher); nested: z_s keeps every token of z_t.
  * ``sdtt`` -- the stochastic baseline (SDTT, Deschenaux & Gulcehre, arXiv 2410.21035): z_t from
    the forward process, then ``substeps`` of the teacher's ancestral sampler from z_t to s
    (fresh random draws). Nested as well.
  * ``data`` -- the earlier recipe: z_t, z_s masked from the data with ONE shared eps (nested;
    the tokens revealed between t and s are the data's).
  * ``independent`` -- z_t and z_s masked independently (not nested; kept as a reference).

Target q [B, L, V] (float32, on the teacher's device): one-hot of z_t where z_t is visible (the
carry-over: the student copies those, they cost nothing), and at the positions masked in z_t
  * ``data`` / ``independent``: one-hot of z_s where z_s is visible, softmax(teacher(z_s)) elsewhere;
  * ``trajectory`` / ``sdtt``: at a position the path revealed at sub-step i, softmax(teacher(z_i))
    there -- the distribution its token was drawn from, i.e. the one-hot of the drawn token
    averaged over that position's own token noise (same expectation, so the same forward-KL
    optimum, and a finite reverse KL); at positions still masked at s, softmax(teacher(z_s)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from difftools.discrete.duality import GaussianDuality
from difftools.discrete.masked import MaskedDiffusion
from difftools.discrete.sampling import RevealNoise, ancestral_step, deterministic_step, step_times

PAIRS = ("trajectory", "sdtt", "data", "independent")


@dataclass
class Pair:
    """z_t and z_s [B, L] and the target q [B, L, V] (float32), on the teacher's device."""

    z_t: torch.Tensor
    z_s: torch.Tensor
    target: torch.Tensor


def pair_times(batch: int, dt: float, t_min: float, generator: torch.Generator | None = None):
    """(t, s) [B] float64 as in Duo: t = min(t_min + (1 - t_min) u + dt, 1), s = t - dt (on the
    generator's device)."""
    device = generator.device if generator is not None else None
    u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
    t = (t_min + (1.0 - t_min) * u + dt).clamp(max=1.0)
    return t, t - dt


def _onehot(z: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return F.one_hot(z.clamp(max=vocab_size - 1), vocab_size).float()


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_path(teacher, process: MaskedDiffusion, z_t: torch.Tensor, t, s, substeps: int, *,
                 noise: RevealNoise | None = None, generator: torch.Generator | None = None):
    """The teacher's ``substeps``-step path from z_t (time t, [B]) to time s, and the target on it.

    Deterministic (the duality's sampler) when ``noise`` is given, else ancestral with draws from
    ``generator``. Returns (z_s, target) on the teacher's device (module docstring)."""
    if substeps < 1:
        raise ValueError(f"teacher_path: substeps must be >= 1, got {substeps}")
    device, mask_id, vocab = _device(teacher), process.mask_id, process.vocab_size
    z = z_t.to(device)
    times = step_times(t, s, substeps)
    target = torch.zeros((*z.shape, vocab), dtype=torch.float32, device=device)
    visible = z != mask_id
    target[visible] = _onehot(z[visible], vocab)
    if noise is not None:
        noise = noise.to(device)
        r = GaussianDuality(process).snr(times)
    for i in range(substeps):
        logits = teacher(z).float()
        probs = torch.softmax(logits, -1)
        if noise is not None:
            z_next, revealed = deterministic_step(logits, z, r[i + 1], noise, mask_id)
        else:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            z_next, revealed = ancestral_step(probs.double().to(gen_device), z, process.alpha(times[i]),
                                              process.alpha(times[i + 1]), mask_id, generator)
        target[revealed] = probs[revealed]
        z = z_next
    still = z == mask_id
    target[still] = torch.softmax(teacher(z).float(), -1)[still]
    return z, target


@torch.no_grad()
def make_pair(kind: str, teacher, process: MaskedDiffusion, x0: torch.Tensor, t, s, substeps: int = 1,
              generator: torch.Generator | None = None) -> Pair:
    """The pair ``kind`` (one of ``PAIRS``) for the data batch x0 [B, L] (CPU) at times t > s [B]."""
    duality = GaussianDuality(process)
    if kind == "trajectory":
        noise = RevealNoise.draw(tuple(x0.shape), process.vocab_size, generator, x0=x0)
        z_t = duality.mask(x0, t, noise.tau)
        z_s, target = teacher_path(teacher, process, z_t, t, s, substeps, noise=noise)
        return Pair(z_t.to(z_s.device), z_s, target)
    if kind == "sdtt":
        z_t = process.mask(x0, t, generator)
        z_s, target = teacher_path(teacher, process, z_t, t, s, substeps, generator=generator)
        return Pair(z_t.to(z_s.device), z_s, target)
    if kind == "data":
        z_t, z_s = duality.coupled_pair(x0, t, s, generator)
    elif kind == "independent":
        z_t, z_s = process.mask(x0, t, generator), process.mask(x0, s, generator)
    else:
        raise ValueError(f"unknown pairs {kind!r}; choose one of {PAIRS}")
    device, vocab = _device(teacher), process.vocab_size
    z_t, z_s = z_t.to(device), z_s.to(device)
    target = torch.softmax(teacher(z_s).float(), -1)
    visible_s = z_s != process.mask_id
    target[visible_s] = _onehot(z_s[visible_s], vocab)
    visible_t = z_t != process.mask_id  # independent pairs: z_t may show a token z_s hides
    target[visible_t] = _onehot(z_t[visible_t], vocab)
    return Pair(z_t, z_s, target)
