"""The S³ search space at a fixed NFE: random candidates, mutation and crossover.

A candidate is a :class:`~samplers.schedule.SolverSchedule`. Per step the decisions of
:class:`~samplers.usf.Strategy` are drawn (prediction data | noise, Taylor order 1..3, coefficient
taylor | bh1 | bh2 | dpm, corrector None | pseudo); an implicit corrector (+1 NFE) is only added
together with the removal of a step, and the reverse, so every candidate spends exactly the
budget NFE. Time points live in lambda = log(alpha/sigma): the first and last are fixed, interior
points move by Gaussian offsets relative to the local step and are projected back to strictly
increasing lambda with a minimal gap, so every grid stays strictly decreasing in t.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from samplers.schedule import SolverSchedule
from samplers.search.config import SearchConfig
from samplers.usf import COEFS, CORRECTORS, SOLVER_PREDICTIONS, Strategy


class Rng:
    """Draws from one torch.Generator, so a search is reproducible from its seed."""

    def __init__(self, generator: torch.Generator):
        self.g = generator

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.g, dtype=torch.float64))

    def normal(self) -> float:
        return float(torch.randn((), generator=self.g, dtype=torch.float64))

    def randint(self, n: int) -> int:
        return int(torch.randint(int(n), (), generator=self.g))

    def choice(self, seq):
        return seq[self.randint(len(seq))]


class SearchSpace:
    """Random candidates, mutation and crossover at a fixed NFE in lambda coordinates."""

    def __init__(self, process, nfe, t_start, t_end, cfg: SearchConfig, rng: Rng):
        self.process, self.nfe, self.t_start, self.t_end, self.cfg, self.rng = (
            process,
            int(nfe),
            float(t_start),
            float(t_end),
            cfg,
            rng,
        )
        self.lam_start = self._lam(t_start)
        self.lam_end = self._lam(t_end)
        if not math.isfinite(self.lam_end):
            raise ValueError(
                f"t_end = {t_end} has lambda = {self.lam_end}; choose t_end with sigma > 0 and alpha > 0"
            )
        self.lam_lo = (
            self.lam_start if math.isfinite(self.lam_start) else min(cfg.lambda_min, self.lam_end - 1.0)
        )
        self.correctors = CORRECTORS[:2]  # implicit only via the structural mutation (it changes steps)

    def _lam(self, t: float) -> float:
        a = float(self.process.alpha(torch.tensor(t, dtype=torch.float64)))
        s = float(self.process.sigma(torch.tensor(t, dtype=torch.float64)))
        if s <= 0:
            return math.inf
        return -math.inf if a <= 0 else math.log(a / s)

    # -------------------------------------------------------------- time grid in lambda
    def interior_lams(self, sched: SolverSchedule) -> list[float]:
        return [self._lam(float(t)) for t in sched.times[1:-1]]

    def times_from(self, lams: list[float]) -> torch.Tensor | None:
        """Project interior lambdas to strictly increasing ones with gaps >= min_gap inside
        (lam_lo, lam_end); the grid in t, or None if the interval cannot hold them."""
        n = len(lams)
        gap = self.cfg.min_gap
        lo, hi = self.lam_lo + gap, self.lam_end - gap
        if n and hi - lo < gap * (n - 1):
            return None
        lams = sorted(lams)
        out = []
        for i, v in enumerate(lams):  # forward pass: lower bounds, backward pass: upper bounds
            v = max(v, lo if i == 0 else out[-1] + gap)
            out.append(v)
        for i in range(n - 1, -1, -1):
            bound = hi if i == n - 1 else out[i + 1] - gap
            out[i] = min(out[i], bound)
        inner = self.process.t_of_lambda(torch.tensor(out, dtype=torch.float64)) if n else torch.empty(0)
        times = torch.cat(
            [
                torch.tensor([self.t_start], dtype=torch.float64),
                inner.to(torch.float64),
                torch.tensor([self.t_end], dtype=torch.float64),
            ]
        )
        if not bool((times[1:] < times[:-1]).all()) or not bool(torch.isfinite(times).all()):
            return None
        return times

    def _local_step(self, lams: list[float], i: int) -> float:
        left = self.lam_lo if i == 0 else lams[i - 1]
        right = self.lam_end if i == len(lams) - 1 else lams[i + 1]
        return (right - left) / 2.0

    # -------------------------------------------------------------- decisions
    def random_strategy(self, i: int) -> Strategy:
        r = self.rng
        return Strategy(
            r.choice(SOLVER_PREDICTIONS),
            1 + r.randint(min(3, i + 1)),
            r.choice(COEFS),
            r.choice(self.correctors),
        )

    def mutate_strategy(self, s: Strategy, i: int) -> Strategy:
        r, p = self.rng, self.cfg.decision_prob
        if r.uniform() < p:
            s = replace(s, prediction=r.choice(SOLVER_PREDICTIONS))
        if r.uniform() < p:
            s = replace(s, order=1 + r.randint(min(3, i + 1)), nodes=None)
        if r.uniform() < p:
            s = replace(s, coef=r.choice(COEFS))
        if s.corrector != "implicit" and r.uniform() < p:
            s = replace(s, corrector=r.choice(self.correctors))
        return s

    # -------------------------------------------------------------- candidates
    def random(self) -> SolverSchedule | None:
        r = self.rng
        n_implicit = 1 if self.cfg.allow_implicit and self.nfe >= 3 and r.uniform() < 0.3 else 0
        steps = self.nfe - n_implicit
        grid = torch.linspace(self.lam_lo, self.lam_end, steps + 1, dtype=torch.float64).tolist()
        h = (self.lam_end - self.lam_lo) / steps
        lams = [v + 0.3 * h * r.normal() for v in grid[1:-1]]
        times = self.times_from(lams)
        if times is None:
            return None
        strategies = [self.random_strategy(i) for i in range(steps)]
        if n_implicit:
            j = r.randint(steps)
            strategies[j] = replace(strategies[j], corrector="implicit")
        return self._checked(times, strategies)

    def mutate(self, parent: SolverSchedule) -> SolverSchedule | None:
        r, cfg = self.rng, self.cfg
        lams = self.interior_lams(parent)
        strategies = list(parent.strategies)
        if cfg.allow_implicit and r.uniform() < cfg.implicit_prob:
            implicit = [i for i, s in enumerate(strategies) if s.corrector == "implicit"]
            if implicit and (r.uniform() < 0.5 or len(strategies) < 2):
                # drop an implicit corrector, spend its evaluation on a new step (split a finite step)
                j = r.choice(implicit)
                strategies[j] = replace(strategies[j], corrector=None)
                bounds = [self.lam_start] + lams + [self.lam_end]
                finite = [k for k in range(len(strategies)) if math.isfinite(bounds[k])]
                if not finite:
                    return None
                k = r.choice(finite)
                lams.insert(k, 0.5 * (bounds[k] + bounds[k + 1]))
                strategies.insert(k + 1, replace(strategies[k], corrector=None))
            elif len(strategies) >= 2:
                # merge two steps (drop an interior point) and give one step an implicit corrector
                k = r.randint(len(lams))
                del lams[k]
                del strategies[k + 1]
                j = r.randint(len(strategies))
                strategies[j] = replace(strategies[j], corrector="implicit")
        for i in range(len(lams)):
            if r.uniform() < cfg.time_prob:
                lams[i] += cfg.time_sigma * self._local_step(lams, i) * r.normal()
        strategies = [self.mutate_strategy(s, i) for i, s in enumerate(strategies)]
        times = self.times_from(lams)
        return None if times is None else self._checked(times, strategies)

    def crossover(self, a: SolverSchedule, b: SolverSchedule) -> SolverSchedule | None:
        if a.steps != b.steps:
            return None
        r = self.rng
        la, lb = self.interior_lams(a), self.interior_lams(b)
        lams = [x if r.uniform() < 0.5 else y for x, y in zip(la, lb, strict=True)]
        strategies = [x if r.uniform() < 0.5 else y for x, y in zip(a.strategies, b.strategies, strict=True)]
        times = self.times_from(lams)
        return None if times is None else self._checked(times, strategies)

    def _checked(self, times, strategies) -> SolverSchedule | None:
        # orders above the available history are lowered by the plan anyway; store what runs
        strategies = [
            replace(s, order=min(int(s.order), i + 1)) if s.singlestep is None else s
            for i, s in enumerate(strategies)
        ]
        sched = SolverSchedule(times, strategies, self.process)
        return sched if sched.nfe == self.nfe else None
