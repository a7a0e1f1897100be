"""S³: search a per-step solver schedule (time points + one USF strategy per step) at a fixed NFE.

Liu et al., "Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models"
(USF / S³, arXiv 2312.07243; official code thu-nics/USF). Every step s -> t of the schedule is the
exponential-integrator update of :mod:`samplers.usf` (h = lambda_t - lambda_s):

    data form:  x_t = (sigma_t/sigma_s) x_s + alpha_t h phi_1(-h) x0_s + alpha_t sum_{k>=1} g_k d_k
    noise form: x_t = (alpha_t/alpha_s) x_s - sigma_t h phi_1(h) eps_s - sigma_t sum_{k>=1} g_k d_k

with Taylor coefficients g_k (``coef``: exact, UniPC's B(h) or DPM-Solver's) and derivatives d_k
from previous evaluations; see ``samplers/usf.py`` for the equations and the corrector.

The search space (:mod:`samplers.search.space`) is every step's decisions of
:class:`~samplers.usf.Strategy` (prediction data | noise, Taylor order 1..3, coefficient taylor |
bh1 | bh2 | dpm, corrector None | pseudo | implicit) and the interior time points, at exactly the
budget NFE. The search (:mod:`samplers.search.evolution`) is plain evolution as in the released
code, seeded with the named baselines, scored on fixed noise by ``score_fn(x) -> float`` (lower is
better; :func:`reference_score` is the distance-to-teacher proxy). Deterministic given the seed.

Modules: :mod:`samplers.schedule` (the :class:`SolverSchedule` file format),
:mod:`samplers.search.space` (candidates, mutation, crossover), :mod:`samplers.search.evolution`
(the loop), :mod:`samplers.search.score` (scores), :mod:`samplers.search.config`. The names below
are importable from ``samplers.search`` as before the split.
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
from samplers.search.evolution import BASELINES, SearchResult, search
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
    "plan_nfe",
    "reference_score",
    "schedule_key",
    "search",
    "strategy_from_dict",
    "strategy_to_dict",
]
