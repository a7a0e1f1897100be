"""The S³ search space: random candidates, mutation, crossover and NFE-changing structural moves.

A candidate is a :class:`~samplers.schedule.SolverSchedule`: a time grid and one
:class:`~samplers.usf.Strategy` per step (the decisions and their equations are in
:mod:`samplers.usf`). Per step the space draws the prediction (data | noise), the Taylor order p
(1..4, weighted as in the released ``evo_search.yml``, capped by the history), the estimate order
q in [p - 1, max_nodes] (the previous evaluations (1, ..., q) estimate the derivatives), the
coefficient variant (taylor | bh1 | bh2 | dpm), the continuous relaxation c of the first
derivative (g_1 <- (1 + c h) g_1, a Gaussian walk from c = 0) and the corrector (None | pseudo).
The schedule-level decisions are the interior time points, t_end (optional), the analytical first
step (x0 = 0 or the data mean in place of the first evaluation, -1 NFE) and implicit correctors
(+1 NFE each).

Time points live in lambda = log(alpha/sigma): t_start is fixed, t_end moves in log t inside
``t_end_range`` when given; interior points move by Gaussian offsets relative to the local step and
are projected back to strictly increasing lambda with a minimal gap, so every grid stays strictly
decreasing in t.

NFE. Every move that changes the evaluation count is a *structural move* with a known NFE delta:
split a step at its lambda midpoint (+1) / merge two steps (-1), analytical first step off (+1) /
on (-1), implicit corrector added (+1) / removed (-1). :meth:`SearchSpace.child` makes a child of a
given target NFE from a parent of NFE target - 1, target or target + 1 by one move, or (same NFE) by
an NFE-neutral pair of moves or none; the candidate is kept only if its plan spends exactly the
target NFE (counted by :func:`samplers.schedule.plan_nfe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from samplers.schedule import SolverSchedule
from samplers.search.config import SearchConfig
from samplers.usf import Strategy


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

    def weighted(self, weights) -> int:
        """An index drawn with probability proportional to ``weights``."""
        total = float(sum(weights))
        u, acc = self.uniform() * total, 0.0
        for i, w in enumerate(weights):
            acc += w
            if u < acc:
                return i
        return max(i for i, w in enumerate(weights) if w > 0)


class SearchSpace:
    """Candidates at a given NFE in lambda coordinates (see the module docstring).

    Args:
        process: the noise process of the model.
        t_start, t_end: the grid's first time and its default last time.
        cfg: the search settings (decision values, probabilities, t_end range).
        rng: the random source.
        x0_mean: the data mean for the ``mean`` analytical first step (a tensor of one sample's
            shape or one value per channel), or None (then only ``zero`` is offered).
    """

    def __init__(self, process, t_start: float, t_end: float, cfg: SearchConfig, rng: Rng, x0_mean=None):
        self.process, self.t_start, self.t_end, self.cfg, self.rng = (
            process,
            float(t_start),
            float(t_end),
            cfg,
            rng,
        )
        self.lam_start = self._lam(t_start)
        lo_end = cfg.t_end_range[1] if cfg.t_end_range else self.t_end
        lam_end = self._lam(lo_end)
        if not math.isfinite(self._lam(self.t_end)) or not math.isfinite(lam_end):
            raise ValueError(
                f"t_end = {t_end} has infinite lambda; choose t_end with sigma > 0 and alpha > 0"
            )
        if cfg.t_end_range and not cfg.t_end_range[0] <= self.t_end <= cfg.t_end_range[1]:
            raise ValueError(f"t_end = {t_end} lies outside t_end_range {cfg.t_end_range}")
        if not self.t_start > (cfg.t_end_range[1] if cfg.t_end_range else self.t_end):
            raise ValueError(f"t_start ({t_start}) must be larger than every t_end")
        self.lam_lo = self.lam_start if math.isfinite(self.lam_start) else min(cfg.lambda_min, lam_end - 1.0)
        self.afs_values: dict[str, tuple[float, ...]] = {}
        for kind in cfg.afs:
            if kind == "zero":
                self.afs_values[kind] = (0.0,)
            elif x0_mean is not None:
                self.afs_values[kind] = tuple(float(v) for v in torch.as_tensor(x0_mean).flatten())

    def _lam(self, t: float) -> float:
        a = float(self.process.alpha(torch.tensor(float(t), dtype=torch.float64)))
        s = float(self.process.sigma(torch.tensor(float(t), dtype=torch.float64)))
        if s <= 0:
            return math.inf
        return -math.inf if a <= 0 else math.log(a / s)

    # -------------------------------------------------------------- time grid in lambda
    def interior_lams(self, sched: SolverSchedule) -> list[float]:
        return [self._lam(float(t)) for t in sched.times[1:-1]]

    def times_from(self, lams: list[float], t_end: float) -> torch.Tensor | None:
        """Project interior lambdas to strictly increasing ones with gaps >= min_gap inside
        (lam_lo, lambda(t_end)); the grid in t, or None if the interval cannot hold them."""
        n = len(lams)
        gap = self.cfg.min_gap
        lo, hi = self.lam_lo + gap, self._lam(t_end) - gap
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
                torch.tensor([float(t_end)], dtype=torch.float64),
            ]
        )
        if not bool((times[1:] < times[:-1]).all()) or not bool(torch.isfinite(times).all()):
            return None
        return times

    def _local_step(self, lams: list[float], i: int, lam_end: float) -> float:
        left = self.lam_lo if i == 0 else lams[i - 1]
        right = lam_end if i == len(lams) - 1 else lams[i + 1]
        return (right - left) / 2.0

    def random_t_end(self) -> float:
        if self.cfg.t_end_range is None:
            return self.t_end
        lo, hi = self.cfg.t_end_range
        return math.exp(math.log(lo) + self.rng.uniform() * (math.log(hi) - math.log(lo)))

    def move_t_end(self, t_end: float) -> float:
        """A Gaussian step in log t, reflected into t_end_range."""
        lo, hi = (math.log(v) for v in self.cfg.t_end_range)
        v = math.log(t_end) + self.cfg.t_end_sigma * self.rng.normal()
        if hi > lo:
            period = 2 * (hi - lo)
            v = (v - lo) % period
            v = lo + (period - v if v > hi - lo else v)
        return math.exp(min(max(v, lo), hi))

    # -------------------------------------------------------------- decisions
    def random_order(self, i: int) -> int:
        """A Taylor order drawn from ``order_weights``, capped by the i evaluations before step i."""
        weights = list(self.cfg.order_weights[: i + 1])
        if sum(weights) <= 0:
            return 1
        return 1 + self.rng.weighted(weights)

    def random_nodes(self, order: int, i: int) -> tuple[int, ...] | None:
        """Nodes (1, ..., q) with the estimate order q drawn in [order - 1, min(max_nodes, i)];
        None (the default, q = order - 1) when that is the draw or order is 1."""
        if order < 2:
            return None
        q = order - 1 + self.rng.randint(max(1, min(self.cfg.max_nodes, i) - order + 2))
        return None if q == order - 1 else tuple(range(1, q + 1))

    def random_strategy(self, i: int) -> Strategy:
        r, cfg = self.rng, self.cfg
        order = self.random_order(i)
        return Strategy(
            r.choice(cfg.predictions),
            order,
            r.choice(cfg.coefs),
            r.choice(cfg.correctors),
            self.random_nodes(order, i),
        )

    def mutate_strategy(self, s: Strategy, i: int) -> Strategy:
        r, cfg, p = self.rng, self.cfg, self.cfg.decision_prob
        if r.uniform() < p:
            s = replace(s, prediction=r.choice(cfg.predictions))
        if r.uniform() < p:
            s = replace(s, order=self.random_order(i), nodes=None)
        if r.uniform() < p:
            s = replace(s, nodes=self.random_nodes(int(s.order), i))
        if r.uniform() < p:
            s = replace(s, coef=r.choice(cfg.coefs))
        if s.corrector != "implicit" and r.uniform() < p:
            s = replace(s, corrector=r.choice(cfg.correctors))
        if cfg.relax_sigma > 0 and r.uniform() < p:
            c = s.relax + cfg.relax_sigma * r.normal()
            s = replace(s, relax=min(max(c, -cfg.relax_max), cfg.relax_max))
        return s

    # -------------------------------------------------------------- structural moves
    def _moves(
        self, lams: list[float], strategies: list[Strategy], sign: int, lam_end: float
    ) -> list[Callable]:
        """The structural moves with NFE delta ``sign`` available here; each edits (lams, strategies)
        in place."""
        r = self.rng
        has_afs = strategies[0].afs is not None
        implicit = [i for i, s in enumerate(strategies) if s.corrector == "implicit"]
        free = [i for i, s in enumerate(strategies) if s.corrector != "implicit" and s.singlestep is None]

        def split(la, st):  # +1: a new point at the lambda midpoint of a step
            bounds = [self.lam_lo] + la + [lam_end]
            k = r.randint(len(st))
            la.insert(k, 0.5 * (bounds[k] + bounds[k + 1]))
            st.insert(k + 1, replace(st[k], corrector=None, afs=None))

        def merge(la, st):  # -1: drop an interior point, two steps become one
            k = r.randint(len(la))
            del la[k]
            del st[k + 1]

        def afs_off(la, st):  # +1: evaluate the model at the first point again
            st[0] = replace(st[0], afs=None)

        def afs_on(la, st):  # -1: the analytical first step
            st[0] = replace(st[0], afs=self.afs_values[r.choice(sorted(self.afs_values))])

        def add_implicit(la, st):  # +1
            j = r.choice(free)
            st[j] = replace(st[j], corrector="implicit")

        def remove_implicit(la, st):  # -1
            j = r.choice(implicit)
            st[j] = replace(st[j], corrector=None)

        if sign > 0:
            moves = [split] + ([afs_off] if has_afs else [])
            moves += [add_implicit] if self.cfg.allow_implicit and free else []
        else:
            moves = [merge] if len(strategies) >= 2 else []
            moves += [afs_on] if self.afs_values and not has_afs else []
            moves += [remove_implicit] if implicit else []
        return moves

    def _restructure(self, lams, strategies, delta: int, lam_end: float) -> bool:
        """Apply structural moves whose NFE deltas sum to ``delta`` (-1, 0 or +1); False if none fits."""
        signs = [delta] if delta else ([1, -1] if self.rng.uniform() < 0.5 else [-1, 1])
        for sign in signs:
            moves = self._moves(lams, strategies, sign, lam_end)
            if not moves:
                return False
            self.rng.choice(moves)(lams, strategies)
        return True

    # -------------------------------------------------------------- candidates
    def random(self, nfe: int) -> SolverSchedule | None:
        """A random candidate of ``nfe`` evaluations (None if the draw does not fit)."""
        r, cfg = self.rng, self.cfg
        # the analytical first step: off or one of the offered kinds, uniformly (the released
        # evo_search.yml draws no_afs / zero_x0 / average_x0 with 0.3 / 0.3 / 0.4)
        kind = r.choice([None, *sorted(self.afs_values)])
        afs = None if kind is None else self.afs_values[kind]
        n_implicit = 1 if cfg.allow_implicit and nfe >= 3 and r.uniform() < 0.3 else 0
        steps = nfe - n_implicit + (afs is not None)
        if steps < 1:
            return None
        t_end = self.random_t_end()
        lam_end = self._lam(t_end)
        grid = torch.linspace(self.lam_lo, lam_end, steps + 1, dtype=torch.float64).tolist()
        h = (lam_end - self.lam_lo) / steps
        lams = [v + cfg.time_jitter * h * r.normal() for v in grid[1:-1]] if cfg.time_jitter else grid[1:-1]
        times = self.times_from(lams, t_end)
        if times is None:
            return None
        strategies = [self.random_strategy(i) for i in range(steps)]
        if n_implicit:
            j = r.randint(steps)
            strategies[j] = replace(strategies[j], corrector="implicit")
        if afs is not None:
            strategies[0] = replace(strategies[0], afs=afs)
        return self._checked(times, strategies, nfe)

    def child(self, parent: SolverSchedule, nfe: int) -> SolverSchedule | None:
        """Mutate ``parent`` into a candidate of ``nfe`` evaluations (parent NFE within one of it)."""
        r, cfg = self.rng, self.cfg
        delta = int(nfe) - parent.nfe
        if abs(delta) > 1:  # one structural move changes the NFE by one
            return None
        lams = self.interior_lams(parent)
        strategies = list(parent.strategies)
        t_end = float(parent.times[-1])
        if cfg.t_end_range is not None and r.uniform() < cfg.time_prob:
            t_end = self.move_t_end(t_end)
        lam_end = self._lam(t_end)
        if (delta or r.uniform() < cfg.structural_prob) and not self._restructure(
            lams, strategies, delta, lam_end
        ):
            return None
        for i in range(len(lams)):
            if r.uniform() < cfg.time_prob:
                lams[i] += cfg.time_sigma * self._local_step(lams, i, lam_end) * r.normal()
        strategies = [self.mutate_strategy(s, i) for i, s in enumerate(strategies)]
        times = self.times_from(lams, t_end)
        return None if times is None else self._checked(times, strategies, nfe)

    def crossover(self, a: SolverSchedule, b: SolverSchedule) -> SolverSchedule | None:
        """Uniform crossover of two parents with the same number of steps (None otherwise)."""
        if a.steps != b.steps:
            return None
        r = self.rng
        la, lb = self.interior_lams(a), self.interior_lams(b)
        lams = [x if r.uniform() < 0.5 else y for x, y in zip(la, lb, strict=True)]
        strategies = [x if r.uniform() < 0.5 else y for x, y in zip(a.strategies, b.strategies, strict=True)]
        t_end = float(a.times[-1] if r.uniform() < 0.5 else b.times[-1])
        times = self.times_from(lams, t_end)
        return None if times is None else self._checked(times, strategies, None)

    def _checked(self, times, strategies, nfe: int | None) -> SolverSchedule | None:
        # orders above the available history are lowered by the plan anyway; store what runs, and
        # keep the analytical first step on step 0 only
        strategies = [
            replace(
                s,
                order=min(int(s.order), i + 1) if s.singlestep is None else s.order,
                nodes=_fit_nodes(s, i),
                afs=s.afs if i == 0 else None,
            )
            for i, s in enumerate(strategies)
        ]
        sched = SolverSchedule(times, strategies, self.process)
        return sched if nfe is None or sched.nfe == int(nfe) else None


def _fit_nodes(s: Strategy, i: int) -> tuple[int, ...] | None:
    """The nodes that exist at step i (j <= i), if they still cover the (lowered) order's
    derivative terms; otherwise the default (None)."""
    order = min(int(s.order), i + 1)
    if s.nodes is None or order < 2:
        return None
    nodes = tuple(j for j in s.nodes if j <= i)
    return nodes if len(nodes) >= order - 1 else None
