"""The S³ evolution loop: plain evolution over :mod:`samplers.search.space` at a fixed NFE.

As in the released code (thu-nics/USF; the paper's learned performance predictor is not released and
not reproduced): generation 0 is the named baselines at this NFE (DDIM, DPM-Solver++(2M/3M),
UniPC-bh2 on the logSNR grid, written as schedules, so the result is never worse than the best of
them on the search score) plus random candidates; each later generation draws parents from the
best ``top_k`` evaluated so far and makes children by (optional uniform) crossover and mutation of
a few decisions / time points. Every candidate is scored on the same fixed noise by
``score_fn(x) -> float`` (lower is better); candidates with non-finite samples score inf; schedules
equivalent to one already scored (:func:`~samplers.schedule.schedule_key`) are redrawn.
Deterministic given the seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from samplers.sampling import SOLVERS
from samplers.schedule import SolverSchedule, baseline_schedule, schedule_key
from samplers.search.config import SearchConfig
from samplers.search.space import Rng, SearchSpace

BASELINES = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2")


@dataclass
class SearchResult:
    """best: the lowest-score schedule; history: (generation, best score so far) per generation;
    baselines: the baselines' scores; evaluations: candidates scored; top: the final (score,
    schedule) parents, best first."""

    best: SolverSchedule
    best_score: float
    history: list[tuple[int, float]]
    baselines: dict[str, float]
    evaluations: int
    top: list[tuple[float, SolverSchedule]]



def search(
    model_fn,
    x_T: torch.Tensor,
    score_fn: Callable[[torch.Tensor], float],
    nfe: int,
    *,
    cond: dict | None = None,
    t_start: float = 1.0,
    t_end: float = 1e-3,
    budget: int | None = None,
    config: SearchConfig | None = None,
    baselines: Sequence[str] = BASELINES,
    seed: int | torch.Generator = 0,
    progress: bool = True,
) -> SearchResult:
    """Evolutionary S³ search of a schedule with exactly ``nfe`` evaluations (see module docstring).

    Args:
        model_fn: a :class:`~samplers.model.ModelFn` (or guidance wrapper).
        x_T: the fixed calibration noise at ``t_start`` (every candidate starts from it).
        score_fn: ``score_fn(samples) -> float``, lower is better (e.g. :func:`reference_score`).
        nfe: the evaluation budget of every candidate.
        cond: network conditioning (e.g. ``{"y": labels}``), the same for every candidate.
        budget: candidate evaluations (overrides ``config.budget``).
        baselines: named solvers put into generation 0 (those that cannot spend exactly ``nfe``
            evaluations are left out).
        seed: an int or a ``torch.Generator`` driving every random choice.
        progress: a tqdm bar over evaluations.
    """
    cfg = replace(config or SearchConfig(), **({} if budget is None else {"budget": int(budget)}))
    if int(nfe) < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    rng = Rng(gen)
    process = model_fn.process
    space = SearchSpace(process, nfe, t_start, t_end, cfg, rng)
    cond = dict(cond or {})
    start = []
    for name in baselines:
        try:
            start.append(baseline_schedule(process, name, nfe, t_start, t_end))
        except ValueError:
            if name not in SOLVERS:
                raise
    if cfg.budget < len(start):
        raise ValueError(f"budget {cfg.budget} is smaller than the {len(start)} baselines")

    scored: list[tuple[float, int, SolverSchedule]] = []  # (score, order of evaluation, schedule)
    seen: set[str] = set()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.budget, desc=f"S3 search (NFE {nfe})")

    def evaluate(sched: SolverSchedule) -> float:
        before = getattr(model_fn, "nfe", None)
        score = _score(sched, model_fn, x_T, score_fn, cond)
        if before is not None and math.isfinite(score) and model_fn.nfe - before != sched.nfe:
            raise RuntimeError(f"plan NFE {sched.nfe} differs from the {model_fn.nfe - before} calls made")
        seen.add(schedule_key(sched))
        scored.append((score, len(scored), sched))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{min(s for s, _, _ in scored):.4g}")
        return score

    try:
        baseline_scores = {s.name: evaluate(s) for s in start}
        attempts = 0
        while len(scored) < min(cfg.population, cfg.budget) and attempts < cfg.max_attempts * cfg.population:
            attempts += 1
            cand = space.random()
            if cand is not None and schedule_key(cand) not in seen:
                evaluate(cand)
        history = [(0, min(s for s, _, _ in scored))]
        generation = 0
        while len(scored) < cfg.budget:
            generation += 1
            parents = [s for _, _, s in sorted(scored, key=lambda r: (r[0], r[1]))[: cfg.top_k]]
            made = 0
            for _ in range(cfg.children):
                if len(scored) >= cfg.budget:
                    break
                child = None
                for _attempt in range(cfg.max_attempts):
                    if len(parents) > 1 and rng.uniform() < cfg.crossover_prob:
                        i = rng.randint(len(parents))
                        j = (i + 1 + rng.randint(len(parents) - 1)) % len(parents)
                        base = space.crossover(parents[i], parents[j]) or parents[i]
                    else:
                        base = rng.choice(parents)
                    child = space.mutate(base)
                    if child is not None and schedule_key(child) not in seen:
                        break
                    child = None
                if child is not None:
                    evaluate(child)
                    made += 1
            history.append((generation, min(s for s, _, _ in scored)))
            if made == 0:  # the neighbourhood of the parents is exhausted
                break
    finally:
        if bar is not None:
            bar.close()
    ranked = sorted(scored, key=lambda r: (r[0], r[1]))
    best_score, _, best = ranked[0]
    # a baseline keeps its name when nothing beat it
    best = SolverSchedule(best.times, best.strategies, process, name=best.name, info={"score": best_score})
    return SearchResult(
        best,
        best_score,
        history,
        baseline_scores,
        len(scored),
        [(s, sch) for s, _, sch in ranked[: cfg.top_k]],
    )


def _score(sched: SolverSchedule, model_fn, x_T, score_fn, cond) -> float:
    """The candidate's score; inf for non-finite samples or a numerically impossible plan."""
    try:
        with torch.no_grad():
            x = sched.sample(model_fn, x_T, **cond)
    except (torch.linalg.LinAlgError, OverflowError, ZeroDivisionError):
        return math.inf
    if not bool(torch.isfinite(x).all()):
        return math.inf
    value = float(score_fn(x))
    return value if math.isfinite(value) else math.inf
