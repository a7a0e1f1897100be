"""Masked consistency distillation (MCD, arXiv 2602.00792) in Duo's rounds (Duo: arXiv 2506.10892).

One round k = 1..K trains the student at gap dt_k = 2^(k-1) / N (N = ``base_steps``): for a data
batch, a pair (z_t, target q) of :mod:`~difftools.discrete.pairs` with s = t - dt_k, and

    L = sum_{b, l: z_t^{b,l} = [MASK]} D(q^{b,l}, p_student^{b,l}(. | z_t)) / (B L)

with D the reverse KL(p_student || q) (mode-seeking; Duo's default ``kl-bwd``) or the forward
KL(q || p_student) (``kl-fwd``). Positions visible in z_t carry over on both sides and cost nothing,
so the sum over masked positions divided by B L is Duo's mean over all positions. With a
one-hot target (``data`` / ``independent`` pairs, where z_s shows a token z_t hides) the reverse KL
is infinite; q is floored at ``REVERSE_KL_FLOOR`` there, which turns that term into
(1 - p_x) log(1 / floor) - H(p): a pull of the student's mass onto the data token.

The teacher of round k is a copy of the student made at the round's start (``teacher_mode=refresh``,
Duo's ``update_teacher_every`` with the raw weights, ``teacher_ema=False``) or the original teacher
(``frozen``). After round k the student is meant to sample with N / 2^k steps. ``pairs=mdlm`` is the
control: the same rounds, optimizer and steps spent on plain MDLM training (no teacher).

Each round is one run of the training engine (checkpoints and exact resume in <out>/round<k>); a
finished round is reloaded, not redone.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic

import torch

from difftools.discrete.masked import MaskedDiffusion
from difftools.discrete.objectives import BatchFn, OwnBatches, trainer_config
from difftools.discrete.pairs import PAIRS, Pair, make_pair, pair_times
from difftools.training import Trainer

log = logging.getLogger("difftools.discrete")

DIVERGENCES = ("reverse", "forward")
TEACHER_MODES = ("refresh", "frozen")
ARMS = (*PAIRS, "mdlm")  #: what a round trains on: a pair construction, or ``mdlm`` (the control)
REVERSE_KL_FLOOR = 1e-12


def divergence(student_logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position D(q, p) [B, L] (float32): ``forward`` KL(q || p) or ``reverse`` KL(p || q), with
    p = softmax(student_logits) and q = ``target``."""
    log_p = torch.log_softmax(student_logits.float(), -1)
    if kind == "forward":
        return (torch.special.xlogy(target, target) - target * log_p).sum(-1)
    if kind == "reverse":
        log_q = torch.log(target.clamp_min(REVERSE_KL_FLOOR))
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")


def distill_loss(student_logits: torch.Tensor, pair: Pair, mask_id: int, kind: str) -> torch.Tensor:
    """L above: D summed over the positions masked in z_t, divided by B L."""
    masked = (pair.z_t == mask_id).float()
    return (divergence(student_logits, pair.target, kind) * masked).sum() / masked.numel()


class DistillObjective(OwnBatches):
    """One distillation round on the engine: the student (``self.model``) against a frozen teacher.

    Args:
        student, teacher: TokenTransformers (the teacher is frozen; None for ``pairs=mdlm``).
        process: the masked process.
        batch_fn: ``batch_fn(batch_size, generator) -> x0`` (CPU).
        dt: the round's gap t - s.
        pairs: one of ``ARMS``.
        divergence: ``reverse`` | ``forward``.
        substeps: teacher sampler steps from t to s (``trajectory`` / ``sdtt``).
        seed: of :func:`~difftools.discrete.objectives.batch_generator`.
        t_min: smallest t before the shift by dt.
    """

    def __init__(self, student, teacher, process: MaskedDiffusion, batch_fn: BatchFn, dt: float,
                 pairs: str = "trajectory", divergence: str = "reverse", substeps: int = 1, seed: int = 0,
                 t_min: float = 1e-3, dataset_info: dict | None = None):
        check_options(pairs, divergence, "refresh", substeps)
        if pairs != "mdlm" and teacher is None:
            raise ValueError(f"pairs={pairs!r} needs a teacher (only pairs='mdlm', the control, trains "
                             "without one)")
        super().__init__(student, batch_fn, seed, dataset_info)
        self.register_frozen("teacher", teacher if pairs != "mdlm" else None)
        self.process, self.dt, self.pairs, self.divergence_kind = process, dt, pairs, divergence
        self.substeps, self.t_min = substeps, t_min

    def forward(self, k, generator):
        x0, gen = self.draw(k)
        if self.pairs == "mdlm":
            t, z_t = self.process.corrupt(x0, gen)
            return self.process.loss(self.model(z_t), x0, z_t, t), {}
        t, s = pair_times(x0.shape[0], self.dt, self.t_min, gen)
        pair = make_pair(self.pairs, self.teacher, self.process, x0, t, s, self.substeps, gen)
        loss = distill_loss(self.model(pair.z_t), pair, self.process.mask_id, self.divergence_kind)
        return loss, {}


def check_options(pairs: str, divergence: str, teacher_mode: str, substeps: int) -> None:
    if pairs not in ARMS:
        hint = ""
        if pairs == "coupled":  # the name of the earlier recipe's `distill.coupling` option
            hint = (" ('coupled', the data-built nested masks of the earlier recipe, is now 'data'; the "
                    "teacher's own deterministic path under the duality is 'trajectory')")
        raise ValueError(f"unknown pairs {pairs!r}; choose one of {ARMS}{hint}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"unknown teacher_mode {teacher_mode!r}; choose one of {TEACHER_MODES}")
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")


@dataclass
class RoundResult:
    round: int
    dt: float
    student_steps: int                  #: N / 2^k, the sampling steps the student aims at
    step: int                           #: optimizer steps done in the round (== steps_per_round when done)
    finished: bool                      #: the round reached its last step
    losses: list[float] = field(default_factory=list)  #: this invocation's per-step losses
    checkpoint: Path | None = None


def distill(student, teacher, process: MaskedDiffusion, batch_fn: BatchFn, *, pairs: str = "trajectory",
            divergence: str = "reverse", base_steps: int = 64, rounds: int = 4, steps_per_round: int = 300,
            batch_size: int = 64, lr: float = 1e-4, warmup: int = 20, teacher_mode: str = "refresh",
            substeps: int = 1, out_dir=None, seed: int = 0, time_limit: float | None = None,
            trainer_options: dict | None = None, run_config: dict | None = None,
            dataset_info: dict | None = None,
            on_round: Callable[[int, torch.nn.Module, RoundResult], None] | None = None) -> list[RoundResult]:
    """Run K rounds in place on ``student`` (module docstring); returns the rounds finished or cut short.

    ``out_dir``: round k runs in <out_dir>/round<k> (resume=auto: a killed run continues exactly; a
    finished round is reloaded). None: in memory. ``time_limit`` (seconds, this call): a round that
    reaches it stops with a checkpoint and the call returns (call again to continue). ``on_round(k,
    student, result)`` is called after each finished round (also one reloaded), the student in eval
    mode. ``trainer_options`` override :func:`~difftools.discrete.objectives.trainer_config`'s.
    """
    check_options(pairs, divergence, teacher_mode, substeps)
    if base_steps % 2**rounds:
        raise ValueError(f"base_steps {base_steps} must be divisible by 2^rounds = {2**rounds}")
    start = monotonic()
    results = []
    for k in range(1, rounds + 1):
        dt = 2 ** (k - 1) / base_steps
        left = None if time_limit is None else time_limit - (monotonic() - start)
        if left is not None and left <= 0:
            break
        round_dir = Path(out_dir) / f"round{k}" if out_dir is not None else None
        if pairs == "mdlm":
            target_net = None
        elif teacher_mode == "refresh":  # the student as it starts the round (a resume reloads it after)
            target_net = copy.deepcopy(student)
        else:  # a copy: freezing the caller's teacher would also freeze students copied from it later
            target_net = copy.deepcopy(teacher)
        objective = DistillObjective(student, target_net, process, batch_fn, dt, pairs, divergence, substeps,
                                     seed + k, dataset_info=dataset_info)
        options = dict(batch_size=batch_size, max_steps=steps_per_round, lr=lr, warmup_steps=warmup,
                       time_limit=left, ckpt_every=0, seed=seed + k,
                       resume="auto" if round_dir is not None else None)
        options.update(trainer_options or {})
        log.info("round %d/%d: dt = %.4f (student aims at %d steps), pairs=%s, %s KL", k, rounds, dt,
                 base_steps // 2**k, pairs, divergence)
        result = Trainer(objective, trainer_config(**options), round_dir,
                         run_config={**(run_config or {}), "round": k, "dt": dt}).train()
        student.eval()
        rr = RoundResult(k, dt, base_steps // 2**k, result.step, result.step >= steps_per_round,
                         result.losses, result.checkpoint)
        results.append(rr)
        if not rr.finished:
            break
        if on_round is not None:
            on_round(k, student, rr)
    return results
