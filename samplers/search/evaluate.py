"""Scoring schedules on fixed noise: the evaluation machinery shared by the search and by reports.

Every candidate of a search is sampled from the same noise ``x_T`` (and the same conditioning), so
scores differ only through the schedule; :func:`evaluate` scores given schedules on another noise
set (the held-out evaluation seeds) with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from samplers.schedule import SolverSchedule

#: numerical failures of a candidate's plan or run that score it inf instead of stopping a search
NUMERICAL_ERRORS = (torch.linalg.LinAlgError, OverflowError, ZeroDivisionError)


def sample_schedule(
    sched: SolverSchedule,
    model_fn,
    x_T: torch.Tensor,
    cond: dict | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """``sched.sample`` in batches of ``batch_size`` (the samples do not depend on it); no grad."""
    cond = dict(cond or {})
    n = len(x_T)
    size = n if not batch_size else int(batch_size)
    outs = []
    with torch.no_grad():
        for i in range(0, n, size):
            part = {k: (v[i : i + size] if _per_sample(v, n) else v) for k, v in cond.items()}
            outs.append(sched.sample(model_fn, x_T[i : i + size], **part))
    return torch.cat(outs)


def _per_sample(v, n: int) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n


def score_schedule(
    sched: SolverSchedule,
    model_fn,
    x_T: torch.Tensor,
    score_fn: Callable[[torch.Tensor], float],
    cond: dict | None = None,
    batch_size: int | None = None,
    check_nfe: bool = True,
) -> float:
    """``score_fn`` of the schedule's samples from ``x_T`` (lower is better); inf for non-finite
    samples, a non-finite score or a numerically impossible plan. With ``check_nfe``, a model that
    counts its calls (``model_fn.nfe``) must have received exactly the plan's NFE per batch."""
    before = getattr(model_fn, "nfe", None)
    try:
        x = sample_schedule(sched, model_fn, x_T, cond, batch_size)
    except NUMERICAL_ERRORS:
        return math.inf
    if check_nfe and before is not None:
        batches = max(1, -(-len(x_T) // int(batch_size))) if batch_size else 1
        calls = model_fn.nfe - before
        if calls != sched.nfe * batches:
            raise RuntimeError(
                f"plan NFE {sched.nfe} differs from the {calls / batches:g} calls per batch the model "
                "received"
            )
    if not bool(torch.isfinite(x).all()):
        return math.inf
    value = float(score_fn(x))
    return value if math.isfinite(value) else math.inf


def evaluate(
    model_fn,
    schedules: Mapping[str, SolverSchedule],
    x_T: torch.Tensor,
    score_fn: Callable[[torch.Tensor], float],
    cond: dict | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Scores of named schedules on one noise set (e.g. the held-out evaluation seeds)."""
    return {
        name: score_schedule(sched, model_fn, x_T, score_fn, cond, batch_size)
        for name, sched in schedules.items()
    }
