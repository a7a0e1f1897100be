"""S³: search per-step solver schedules (time points + one USF strategy per step) at given NFEs.

Liu et al., "A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models"
(USF / S³, arXiv 2312.07243; official code thu-nics/USF). Every step s -> t of a schedule is the
exponential-integrator update of :mod:`samplers.usf` (h = lambda_t - lambda_s):

    data form:  x_t = (sigma_t/sigma_s) x_s + alpha_t h phi_1(-h) x0_s + alpha_t sum_{k=1}^{p-1} g_k d_k
    noise form: x_t = (alpha_t/alpha_s) x_s - sigma_t h phi_1(h) eps_s - sigma_t sum_{k=1}^{p-1} g_k d_k

with Taylor order p, coefficients g_k (exact, UniPC's B(h) or DPM-Solver's, times the relaxation
1 + c h on g_1) and derivatives d_k estimated from q >= p - 1 previous evaluations; an optional
analytical first step replaces the first evaluation by a constant x0; see ``samplers/usf.py``.

The search space (:mod:`samplers.search.space`) is every step's decisions of
:class:`~samplers.usf.Strategy` plus the time points, t_end (optional), the analytical first step and
implicit correctors, at exactly each budget NFE. The search (:mod:`samplers.search.evolution`) is a
steady-state evolution over several NFEs in one run, seeded with the named baselines, scored on fixed
noise by ``score_fn(x) -> float`` (lower is better); :func:`evaluate` reports chosen schedules on
other noise. Deterministic given the seed.

Modules: :mod:`samplers.schedule` (the :class:`SolverSchedule` file format),
:mod:`samplers.search.space` (candidates, mutation, crossover, structural moves),
:mod:`samplers.search.evolution` (the loop), :mod:`samplers.search.evaluate` (scoring on fixed noise),
:mod:`samplers.search.score` (the reference score), :mod:`samplers.search.config`.
"""

from samplers.schedule import (
    FORMAT,
    VERSION,
    SolverSchedule,
    baseline_schedule,
    plan_nfe,
    schedule_key,
    strategy_from_dict,
    strategy_to_dict,
)
from samplers.search.config import SearchConfig
from samplers.search.evaluate import evaluate, sample_schedule, score_schedule
from samplers.search.evolution import BASELINES, SearchResult, search, search_nfes
from samplers.search.score import ReferenceScore, reference_score
from samplers.search.space import SearchSpace

__all__ = [
    "BASELINES",
    "FORMAT",
    "VERSION",
    "ReferenceScore",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "SolverSchedule",
    "baseline_schedule",
    "evaluate",
    "plan_nfe",
    "reference_score",
    "sample_schedule",
    "schedule_key",
    "score_schedule",
    "search",
    "search_nfes",
    "strategy_from_dict",
    "strategy_to_dict",
]
