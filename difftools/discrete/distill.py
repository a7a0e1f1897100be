"""Masked Consistency Distillation (MCD, arXiv 2602.00792), Duo-style rounds (Duo: arXiv 2506.10892).

For a data batch x0 and t ~ U[dt, 1], s = t - dt, build a pair (z_t, z_s):
  * ``coupled``: one shared Gaussian eps (duality.GaussianDuality.coupled_pair), so z_s reveals every
    token z_t reveals plus the tokens whose thresholds lie between r_t and r_s (deterministic given eps);
  * ``independent``: z_t, z_s masked independently (the stochastic-pair baseline).
The target at each position is the teacher's carry-over prediction at z_s,
    q(. | z_s) = onehot(z_s) where z_s is visible, else softmax(teacher(z_s)),
and the student at z_t is trained on the positions masked in z_t with
    L = sum_{l: z_t^l = MASK} KL(q^l(. | z_s) || p_student^l(. | z_t)) / (B L).
Rounds: dt_k = 2^(k-1) / N (k = 1..K), so the gap doubles each round; the teacher is a copy of the
student made at the start of each round (``refresh``, as Duo) or the original teacher (``frozen``).
After K rounds the student is meant to sample with N / 2^K steps.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from difftools.discrete.duality import GaussianDuality, independent_pair
from difftools.discrete.trainer import fit, load_state

COUPLINGS = ("coupled", "independent")
TEACHER_MODES = ("refresh", "frozen")


def make_pair(process, x0, t, s, coupling: str, generator=None, duality: GaussianDuality | None = None):
    if coupling == "coupled":
        return (duality or GaussianDuality(process)).coupled_pair(x0, t, s, generator)
    if coupling == "independent":
        return independent_pair(process, x0, t, s, generator)
    raise ValueError(f"unknown coupling {coupling!r}; choose one of {COUPLINGS}")


def distill_loss(student, teacher, process, x0, dt: float, coupling: str, generator=None, duality=None):
    """The per-token KL above for one batch (t drawn uniformly on [dt, 1] per sequence)."""
    b = x0.shape[0]
    t = dt + (1.0 - dt) * torch.rand(b, generator=generator, dtype=torch.float64)
    z_t, z_s = make_pair(process, x0, t, t - dt, coupling, generator, duality)
    with torch.no_grad():
        target = torch.softmax(teacher(z_s).float(), -1)
        visible_s = z_s != process.mask_id
        onehot = F.one_hot(z_s.clamp(max=process.vocab_size - 1), process.vocab_size).float()
        target = torch.where(visible_s.unsqueeze(-1), onehot, target)
    log_student = torch.log_softmax(student(z_t).float(), -1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - log_student)).sum(-1)
    masked_t = (z_t == process.mask_id).float()
    return (kl * masked_t).sum() / masked_t.numel()


def distill(
    student,
    teacher,
    process,
    batch_fn,
    coupling: str = "coupled",
    base_steps: int = 64,
    rounds: int = 4,
    steps_per_round: int = 300,
    batch_size: int = 64,
    lr: float = 1e-4,
    teacher_mode: str = "refresh",
    ckpt_dir=None,
    seed: int = 0,
    time_limit_per_round: float | None = None,
    log=print,
) -> list[list[float]]:
    """Run K distillation rounds in place on ``student``; ``batch_fn(batch_size, generator) -> x0``.
    Round k checkpoints to <ckpt_dir>/round<k>.pt; finished rounds are reloaded, not redone."""
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose one of {COUPLINGS}")
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"unknown teacher_mode {teacher_mode!r}; choose one of {TEACHER_MODES}")
    if base_steps % 2**rounds:
        raise ValueError(f"base_steps {base_steps} must be divisible by 2^rounds = {2**rounds}")
    duality = GaussianDuality(process)
    histories = []
    for k in range(1, rounds + 1):
        dt = 2 ** (k - 1) / base_steps
        ckpt = Path(ckpt_dir) / f"round{k}.pt" if ckpt_dir is not None else None
        if ckpt is not None and ckpt.is_file() and load_state(ckpt)["step"] >= steps_per_round:
            state = load_state(ckpt)
            student.load_state_dict(state["model"])
            histories.append(state["history"])
            continue
        # the loss evaluates the target under no_grad; the frozen teacher's own flags stay untouched
        # because the student may have been deep-copied from it
        target_net = copy.deepcopy(student).requires_grad_(False) if teacher_mode == "refresh" else teacher
        target_net.eval()

        def loss_fn(m, gen, target_net=target_net, dt=dt):
            return distill_loss(m, target_net, process, batch_fn(batch_size, gen), dt, coupling, gen, duality)

        log(f"round {k}/{rounds}: dt = {dt:.4f} (student aims at {base_steps // 2**k} steps), {coupling}")
        histories.append(
            fit(
                student,
                loss_fn,
                steps_per_round,
                lr,
                warmup=20,
                ckpt=ckpt,
                save_every=100,
                seed=seed + k,
                time_limit=time_limit_per_round,
                log_every=100,
                log=log,
            )
        )
    return histories
