"""The S³ search: steady-state evolution over several NFEs in one run.

As in the released code (thu-nics/USF ``search.py``; the paper's learned performance predictor is
not released and not reproduced): one pool of scored candidates per NFE; every iteration picks a
target NFE, draws a parent from the best ``top_k`` of its pool (or, with ``migrate_prob``, from the
pool of NFE +- 1, reached by one structural move that adds or removes an evaluation), optionally
crosses it with a second parent, mutates it (:meth:`~samplers.search.space.SearchSpace.child`),
scores the child and adds it to its pool — one candidate at a time, so every NFE profits from the
others' discoveries. Differences to the released loop: target NFEs are visited in turn (there: drawn
at random), parents are the best ``top_k`` (there: the best 15), and generation 0 holds the named
baselines at every NFE plus random candidates.

Every candidate is scored on the same fixed noise (``x_T``, the search seed set) by
``score_fn(samples) -> float`` (lower is better; the paper scores FID of 1,000 samples); a schedule
equivalent to one already scored (:func:`~samplers.schedule.schedule_key`) is redrawn; non-finite
samples score inf. Selection uses only these scores: report the selected schedules on a disjoint
noise set (:func:`samplers.search.evaluate`). Deterministic given the seed (unless
``time_budget_s`` stops it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from samplers.sampling import SOLVERS
from samplers.schedule import SolverSchedule, baseline_schedule, schedule_key
from samplers.search.config import SearchConfig
from samplers.search.evaluate import score_schedule
from samplers.search.space import Rng, SearchSpace

BASELINES = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2")


@dataclass
class SearchResult:
    """The search's outcome at one NFE.

    best: the lowest-score schedule; best_score: its score; history: (candidates scored so far in
    the whole run, best score at this NFE) each time that best improved; baselines: the baselines'
    scores at this NFE; evaluations: candidates scored at this NFE; top: the best ``top_k``
    (score, schedule), best first; total_evaluations, seconds: of the whole run.
    """

    best: SolverSchedule
    best_score: float
    history: list[tuple[int, float]]
    baselines: dict[str, float]
    evaluations: int
    top: list[tuple[float, SolverSchedule]]
    total_evaluations: int = 0
    seconds: float = 0.0


class _Pools:
    """Scored candidates per NFE, a global set of seen schedule keys, and the scoring bookkeeping."""

    def __init__(self, nfes, score: Callable[[SolverSchedule], float], budget: int, deadline, bar):
        self.pools: dict[int, list[tuple[float, int, SolverSchedule]]] = {n: [] for n in nfes}
        self.history: dict[int, list[tuple[int, float]]] = {n: [] for n in nfes}
        self.seen: dict[str, float] = {}  # schedule key -> score
        self.count = 0
        self._score, self.budget, self.deadline, self.bar = score, budget, deadline, bar

    def full(self) -> bool:
        return self.count >= self.budget or (self.deadline is not None and time.monotonic() >= self.deadline)

    def novel(self, sched: SolverSchedule | None) -> bool:
        return sched is not None and sched.nfe in self.pools and schedule_key(sched) not in self.seen

    def add(self, sched: SolverSchedule) -> float:
        value = self._score(sched)
        n = sched.nfe
        self.seen[schedule_key(sched)] = value
        best_before = self.best_score(n)
        self.pools[n].append((value, self.count, sched))
        self.count += 1
        if value < best_before:
            self.history[n].append((self.count, value))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({f"nfe{k}": f"{self.best_score(k):.4g}" for k in self.pools})
        return value

    def best_score(self, n: int) -> float:
        return min((v for v, _, _ in self.pools[n]), default=math.inf)

    def ranked(self, n: int) -> list[tuple[float, int, SolverSchedule]]:
        return sorted(self.pools[n], key=lambda r: (r[0], r[1]))


def search_nfes(
    model_fn,
    x_T: torch.Tensor,
    score_fn: Callable[[torch.Tensor], float],
    nfes: Sequence[int],
    *,
    cond: dict | None = None,
    t_start: float = 1.0,
    t_end: float = 1e-3,
    budget: int | None = None,
    config: SearchConfig | None = None,
    baselines: Sequence[str] = BASELINES,
    baseline_grids: Sequence[str] = ("logsnr",),
    x0_mean: torch.Tensor | None = None,
    seed: int | torch.Generator = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[int, SearchResult]:
    """Search solver schedules at several NFEs in one steady-state evolution (module docstring).

    Args:
        model_fn: a :class:`~samplers.model.ModelFn` (or guidance wrapper).
        x_T: the fixed search noise at ``t_start`` (every candidate starts from it).
        score_fn: ``score_fn(samples) -> float``, lower is better (e.g. a Fréchet distance of the
            samples' features, or :func:`~samplers.search.reference_score`).
        nfes: the evaluation budgets to search (e.g. (4, 5, 6, 8)); one pool each.
        cond: network conditioning (e.g. ``{"y": labels}``), the same for every candidate.
        t_start, t_end: the grid's ends (``config.t_end_range`` makes t_end a decision).
        budget: candidate evaluations over all NFEs (overrides ``config.budget``).
        baselines, baseline_grids: named solvers on named grids put into generation 0 at each NFE
            (``name`` for the logsnr grid, ``name@grid`` otherwise; those that cannot spend exactly
            that NFE are left out).
        x0_mean: the data mean offered to the analytical first step (``mean``; see
            :class:`~samplers.usf.Strategy`), or None.
        seed: an int or a ``torch.Generator`` driving every random choice.
        batch_size: sample each candidate in batches of this size.
        progress: a tqdm bar over evaluations.

    Returns:
        {nfe: :class:`SearchResult`} in the order of ``nfes``.
    """
    cfg = replace(config or SearchConfig(), **({} if budget is None else {"budget": int(budget)}))
    nfes = [int(n) for n in nfes]
    if not nfes or min(nfes) < 1 or len(set(nfes)) != len(nfes):
        raise ValueError(f"nfes must be distinct integers >= 1, got {nfes}")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    rng = Rng(gen)
    process = model_fn.process
    space = SearchSpace(process, t_start, t_end, cfg, rng, x0_mean)
    cond = dict(cond or {})
    start = {n: _baselines(process, n, baselines, baseline_grids, t_start, t_end) for n in nfes}
    n_start = sum(len(v) for v in start.values())
    if cfg.budget < n_start:
        raise ValueError(f"budget {cfg.budget} is smaller than the {n_start} baselines")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.budget, desc=f"S3 search (NFE {','.join(map(str, nfes))})")
    t0 = time.monotonic()
    deadline = None if cfg.time_budget_s is None else t0 + cfg.time_budget_s
    pools = _Pools(
        nfes,
        lambda sched: score_schedule(sched, model_fn, x_T, score_fn, cond, batch_size),
        cfg.budget,
        deadline,
        bar,
    )
    baseline_scores: dict[int, dict[str, float]] = {n: {} for n in nfes}
    try:
        for n in nfes:  # generation 0: the baselines ...
            for sched in start[n]:
                key = schedule_key(sched)
                if key in pools.seen:  # the same sampler under another name (e.g. 3M = 2M at 4 steps)
                    baseline_scores[n][sched.name] = pools.seen[key]
                elif not pools.full():
                    baseline_scores[n][sched.name] = pools.add(sched)
        _fill_random(pools, space, nfes, cfg)  # ... and random candidates
        _evolve(pools, space, nfes, cfg, rng)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.monotonic() - t0
    results = {}
    for n in nfes:
        ranked = pools.ranked(n)
        if not ranked:
            raise RuntimeError(f"no candidate with NFE {n} was scored; raise the budget")
        best_score, _, best = ranked[0]
        # a baseline keeps its name when nothing beat it
        best = SolverSchedule(
            best.times, best.strategies, process, name=best.name, info={"score": best_score}
        )
        results[n] = SearchResult(
            best,
            best_score,
            pools.history[n],
            baseline_scores[n],
            len(ranked),
            [(v, s) for v, _, s in ranked[: cfg.top_k]],
            pools.count,
            seconds,
        )
    return results


def search(
    model_fn,
    x_T: torch.Tensor,
    score_fn: Callable[[torch.Tensor], float],
    nfe: int,
    **kwargs,
) -> SearchResult:
    """:func:`search_nfes` at one NFE (same keyword arguments); returns its :class:`SearchResult`."""
    if int(nfe) < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return search_nfes(model_fn, x_T, score_fn, [int(nfe)], **kwargs)[int(nfe)]


def _baselines(process, nfe, names, grids, t_start, t_end) -> list[SolverSchedule]:
    out = []
    for grid in grids:
        for name in names:
            try:
                sched = baseline_schedule(process, name, nfe, t_start, t_end, schedule=grid)
            except ValueError:
                if name not in SOLVERS:
                    raise
                continue
            sched.name = name if grid == "logsnr" else f"{name}@{grid}"
            out.append(sched)
    return out


def _fill_random(pools: _Pools, space: SearchSpace, nfes, cfg: SearchConfig) -> None:
    """Random candidates, NFE by NFE in turn, until each pool holds ``population`` candidates."""
    tries = {n: 0 for n in nfes}
    limit = cfg.max_attempts * cfg.population
    while not pools.full():
        open_ = [n for n in nfes if len(pools.pools[n]) < cfg.population and tries[n] < limit]
        if not open_:
            return
        for n in open_:
            if pools.full():
                return
            for _ in range(cfg.max_attempts):
                tries[n] += 1
                cand = space.random(n)
                if pools.novel(cand):
                    pools.add(cand)
                    break


def _evolve(pools: _Pools, space: SearchSpace, nfes, cfg: SearchConfig, rng: Rng) -> None:
    """Steady state: one child per target NFE in turn until the budget (or the time) is spent."""
    stalled = 0
    turn = 0
    while not pools.full() and stalled < len(nfes):
        n = nfes[turn % len(nfes)]
        turn += 1
        child = None
        for _ in range(cfg.max_attempts):
            child = _make_child(pools, space, n, cfg, rng)
            if pools.novel(child):
                break
            child = None
        if child is None:  # the neighbourhood of this NFE's parents is exhausted
            stalled += 1
            continue
        stalled = 0
        pools.add(child)


def _make_child(pools: _Pools, space: SearchSpace, n: int, cfg: SearchConfig, rng: Rng):
    neighbours = [m for m in (n - 1, n + 1) if pools.pools.get(m)]
    source = n
    if neighbours and (not pools.pools[n] or rng.uniform() < cfg.migrate_prob):
        source = rng.choice(neighbours)
    if not pools.pools[source]:
        return None
    parents = [s for _, _, s in pools.ranked(source)[: cfg.top_k]]
    base = rng.choice(parents)
    if len(parents) > 1 and rng.uniform() < cfg.crossover_prob:
        i = rng.randint(len(parents))
        j = (i + 1 + rng.randint(len(parents) - 1)) % len(parents)
        crossed = space.crossover(parents[i], parents[j])
        if crossed is not None and abs(crossed.nfe - n) <= 1:
            base = crossed
    return space.child(base, n)
