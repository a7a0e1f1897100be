"""Settings of the evolutionary S³ search (:func:`samplers.search.search_nfes`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from samplers.schedules import LAMBDA_MIN
from samplers.usf import COEFS, CORRECTORS, MAX_ORDER, SOLVER_PREDICTIONS

AFS_KINDS = ("zero", "mean")


@dataclass
class SearchConfig:
    """Evolutionary-search settings (defaults in the spirit of the released ``evo_search.yml``).

    Budget and population:
        budget: candidate evaluations in all (every NFE, baselines included).
        time_budget_s: stop after this many seconds of search (None: only ``budget`` stops it).
        population: candidates per NFE in generation 0 (baselines + random ones).
        top_k: parents are drawn from the best top_k evaluated so far at the target NFE.
        crossover_prob: chance a child starts from a uniform crossover of two parents.
        migrate_prob: chance that a child of NFE n descends from a parent of NFE n - 1 or n + 1
            (when that NFE is searched too) through one structural move (below).
        structural_prob: chance that a child of the parent's NFE gets an NFE-neutral pair of
            structural moves (one that adds an evaluation, one that removes one).
        max_attempts: retries to make a child not evaluated before.

    Decision space (each redrawn with ``decision_prob`` per step and decision):
        predictions, coefs, correctors: the values a step's prediction / coefficient variant /
            corrector is drawn from (implicit correctors only via structural moves).
        order_weights: P(order = 1, 2, ...) of a drawn Taylor order (official: 0.2 / 0.4 / 0.3 / 0.1),
            capped by the history available at the step.
        max_nodes: the largest number of previous evaluations that estimate the derivatives
            (estimate order q, drawn in [order - 1, max_nodes]); at least max order - 1.
        relax_sigma, relax_max: a relaxation mutation adds N(0, relax_sigma) to c (g_1 <- (1 + c h) g_1),
            clipped to [-relax_max, relax_max]; relax_sigma = 0 keeps c = 0.
        afs: analytical-first-step variants in the space (``zero``: x0 = 0; ``mean``: the data mean
            given to the search as ``x0_mean``); () leaves the first evaluation to the model.
        allow_implicit: implicit correctors (+1 NFE) as structural moves.

    Time grid:
        time_prob / time_sigma: chance per interior time point that it moves, and the std of the
            move in units of the local step in lambda; min_gap: the smallest step in lambda.
        time_jitter: std of a random candidate's interior lambdas around the uniform-logSNR grid,
            in units of its step (0: exactly that grid).
        t_end_range: (lo, hi) to search t_end log-uniformly in it (None: t_end fixed);
            t_end_sigma: std of a t_end move in log t.
        lambda_min: where lambda(t_start) is -inf (Flow at t = 1), the lowest interior lambda.

    Structural moves: split a step at its lambda midpoint (+1 NFE) / merge two steps (-1), switch
    the analytical first step off (+1) / on (-1), add (+1) / remove (-1) an implicit corrector.
    """

    budget: int = 300
    time_budget_s: float | None = None
    population: int = 24
    top_k: int = 8
    crossover_prob: float = 0.3
    migrate_prob: float = 0.2
    structural_prob: float = 0.2
    max_attempts: int = 50
    decision_prob: float = 0.2
    predictions: tuple[str, ...] = SOLVER_PREDICTIONS
    coefs: tuple[str, ...] = COEFS
    correctors: tuple[str | None, ...] = (None, "pseudo")
    order_weights: tuple[float, ...] = (0.2, 0.4, 0.3, 0.1)
    max_nodes: int = 3
    relax_sigma: float = 0.05
    relax_max: float = 2.0
    afs: tuple[str, ...] = AFS_KINDS
    allow_implicit: bool = True
    time_prob: float = 0.3
    time_sigma: float = 0.25
    min_gap: float = 0.05
    time_jitter: float = 0.3
    t_end_range: tuple[float, float] | None = None
    t_end_sigma: float = 0.5
    lambda_min: float = LAMBDA_MIN

    def __post_init__(self):
        if self.budget < 1 or self.population < 1 or self.top_k < 1 or self.max_attempts < 1:
            raise ValueError("budget, population, top_k and max_attempts must be >= 1")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")
        for name in ("crossover_prob", "migrate_prob", "structural_prob", "decision_prob", "time_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("time_sigma", "time_jitter", "relax_sigma", "relax_max", "t_end_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_gap <= 0:
            raise ValueError(f"min_gap must be > 0, got {self.min_gap}")
        self.predictions, self.coefs, self.correctors = (
            tuple(self.predictions),
            tuple(self.coefs),
            tuple(self.correctors),
        )
        self.order_weights, self.afs = tuple(self.order_weights), tuple(self.afs)
        _check_choices("predictions", self.predictions, SOLVER_PREDICTIONS)
        _check_choices("coefs", self.coefs, COEFS)
        _check_choices("correctors", self.correctors, CORRECTORS[:2])
        _check_choices("afs", self.afs, AFS_KINDS, allow_empty=True)
        if not 1 <= len(self.order_weights) <= MAX_ORDER or any(w < 0 for w in self.order_weights):
            raise ValueError(
                f"order_weights: 1..{MAX_ORDER} non-negative weights (orders 1, 2, ...), "
                f"got {self.order_weights}"
            )
        if sum(self.order_weights) <= 0:
            raise ValueError("order_weights must not all be zero")
        if self.max_nodes < len(self.order_weights) - 1:
            raise ValueError(
                f"max_nodes = {self.max_nodes} cannot estimate the {len(self.order_weights) - 1} derivatives "
                f"of order {len(self.order_weights)}; raise max_nodes or shorten order_weights"
            )
        if self.t_end_range is not None:
            lo, hi = (float(v) for v in self.t_end_range)
            if not (0 < lo <= hi < 1 and math.isfinite(hi)):
                raise ValueError(
                    f"t_end_range must be (lo, hi) with 0 < lo <= hi < 1, got {self.t_end_range}"
                )
            self.t_end_range = (lo, hi)


def _check_choices(name: str, values: tuple, allowed: tuple, allow_empty: bool = False) -> None:
    if not values and not allow_empty:
        raise ValueError(f"{name} must list at least one of {allowed}")
    bad = [v for v in values if v not in allowed]
    if bad or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct values from {allowed}, got {values}")
