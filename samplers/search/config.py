"""Settings of the evolutionary S³ search (:func:`samplers.search.search`)."""

from __future__ import annotations

from dataclasses import dataclass

from samplers.schedules import LAMBDA_MIN


@dataclass
class SearchConfig:
    """Evolutionary-search settings (defaults in the spirit of the released ``evo_search.yml``).

    budget: candidate evaluations in all (baselines included).
    population: size of generation 0 (baselines + random candidates).
    children: candidates per later generation; top_k: parents are drawn from the best top_k.
    crossover_prob: chance a child starts from a uniform crossover of two parents.
    decision_prob: chance, per step and per decision, that it is redrawn.
    time_prob / time_sigma: chance per interior time point that it moves, and the std of the move
        in units of the local step in lambda; min_gap: the smallest step in lambda.
    allow_implicit / implicit_prob: whether implicit correctors (+1 NFE, one step fewer) are in
        the space, and the chance per child of adding or removing one.
    lambda_min: where lambda(t_start) is -inf (Flow at t = 1), the lowest interior lambda.
    max_attempts: retries to make a child not evaluated before.
    """

    budget: int = 300
    population: int = 24
    children: int = 16
    top_k: int = 8
    crossover_prob: float = 0.3
    decision_prob: float = 0.2
    time_prob: float = 0.3
    time_sigma: float = 0.25
    min_gap: float = 0.05
    allow_implicit: bool = True
    implicit_prob: float = 0.15
    lambda_min: float = LAMBDA_MIN
    max_attempts: int = 50

    def __post_init__(self):
        if self.population < 1 or self.children < 1 or self.top_k < 1:
            raise ValueError("population, children and top_k must be >= 1")
        for name in ("crossover_prob", "decision_prob", "time_prob", "implicit_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.time_sigma < 0 or self.min_gap <= 0:
            raise ValueError("time_sigma must be >= 0 and min_gap > 0")
