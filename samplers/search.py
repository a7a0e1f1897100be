"""S³: search a per-step solver schedule (time points + one USF strategy per step) at a fixed NFE.

Liu et al., "Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models"
(USF / S³, arXiv 2312.07243; official code thu-nics/USF). Every step s -> t of the schedule is the
exponential-integrator update of :mod:`samplers.usf` (h = lambda_t - lambda_s):

    data form:  x_t = (sigma_t/sigma_s) x_s + alpha_t h phi_1(-h) x0_s + alpha_t sum_{k>=1} g_k d_k
    noise form: x_t = (alpha_t/alpha_s) x_s - sigma_t h phi_1(h) eps_s - sigma_t sum_{k>=1} g_k d_k

with Taylor coefficients g_k (``coef``: exact, UniPC's B(h) or DPM-Solver's) and derivatives d_k
from previous evaluations; see ``samplers/usf.py`` for the equations and the corrector.

Search space per step (the decisions of the paper / released code that :class:`~samplers.usf.Strategy`
covers): prediction (data | noise), Taylor order 1..3, derivative coefficient (taylor | bh1 | bh2 |
dpm), corrector (None | pseudo — UniC, free | implicit — +1 NFE, only with ``allow_implicit``), and
the time points. Time points are kept in lambda = log(alpha/sigma): the first and last points are
fixed (t_start, t_end), interior points move by Gaussian offsets relative to the local step and
are then projected back to strictly increasing lambda with a minimal gap, so every candidate's
grid stays strictly decreasing in t inside [t_end, t_start]. The NFE of a candidate is counted
from its plan (:attr:`SolverSchedule.nfe`) and every candidate has exactly the budget NFE: an
implicit corrector is only added together with the removal of a step (and the reverse).

Search: plain evolution as in the released code (the paper's learned performance predictor is
not released and not reproduced): generation 0 is the named baselines at this NFE (DDIM,
DPM-Solver++(2M/3M), UniPC-bh2 on the logSNR grid, written as schedules, so the result is never
worse than the best of them on the search score) plus random candidates; each later generation
draws parents from the best ``top_k`` evaluated so far and makes children by (optional uniform)
crossover and mutation of a few decisions / time points. All candidates are scored on the same
fixed noise by ``score_fn(x) -> float`` (lower is better): the paper uses FID of 1,000 samples;
:func:`reference_score` gives the distance-to-teacher proxy (RMSE to a high-NFE solution from the
same noise). Candidates with non-finite samples score inf. Deterministic given the seed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from difftools.process import NoiseProcess, process_from_config
from samplers.sampling import SOLVERS, sample, solver_strategies
from samplers.schedules import LAMBDA_MIN, check_times, get_times
from samplers.usf import COEFS, CORRECTORS, PREDICTIONS, StepPlan, Strategy, plan

BASELINES = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2")
FORMAT = "difftools.solver_schedule"
VERSION = 1
_STRATEGY_KEYS = ("prediction", "order", "coef", "corrector", "nodes", "singlestep")
_SCHEDULE_KEYS = {"format", "version", "name", "process", "times", "strategies", "nfe", "info"}


# ------------------------------------------------------------------ the schedule
def strategy_to_dict(s: Strategy) -> dict:
    return {
        "prediction": s.prediction,
        "order": int(s.order),
        "coef": s.coef,
        "corrector": s.corrector,
        "nodes": None if s.nodes is None else [int(j) for j in s.nodes],
        "singlestep": None if s.singlestep is None else [float(r) for r in s.singlestep],
    }


def strategy_from_dict(d, where: str = "strategy") -> Strategy:
    """A :class:`Strategy` from its dict, with a clear error for unknown keys or values."""
    if isinstance(d, Strategy):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
    unknown = set(d) - set(_STRATEGY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {list(_STRATEGY_KEYS)}")
    d = dict(d)
    if not isinstance(d.get("order", 1), int) or isinstance(d.get("order", 1), bool):
        raise ValueError(f"{where}: order must be an integer, got {d.get('order')!r}")
    for key in ("nodes", "singlestep"):
        if d.get(key) is not None:
            if not isinstance(d[key], (list, tuple)):
                raise ValueError(f"{where}: {key} must be a list or null, got {d[key]!r}")
            d[key] = tuple(d[key])
    if d.get("nodes") is not None and not all(isinstance(j, int) and j >= 1 for j in d["nodes"]):
        raise ValueError(f"{where}: nodes must be positive integers, got {list(d['nodes'])}")
    try:
        return Strategy(**d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


@dataclass(eq=False)
class SolverSchedule:
    """A solver schedule: a decreasing time grid and one :class:`~samplers.usf.Strategy` per step.

    Args:
        times: strictly decreasing grid t_0 = t_start > ... > t_N = t_end (float64, in [0, 1]).
        strategies: N strategies (Strategy objects or their dicts).
        process: the noise process the grid's times refer to (the NFE and the step sizes in lambda
            depend on it; sampling a model trained on another process is refused).
        name: a label (``searched`` or the baseline solver's name).
        info: free-form metadata stored with the schedule (search settings, scores).

    ``nfe`` is counted from the plan (:func:`samplers.usf.plan`) exactly as
    :func:`samplers.usf.integrate` evaluates: one evaluation per step unless a pseudo corrector
    of the previous step supplied it, plus singlestep stages, plus the corrector's evaluation.
    """

    times: torch.Tensor
    strategies: list
    process: NoiseProcess
    name: str = "searched"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.times = check_times(self.times)
        if float(self.times.min()) < 0.0 or float(self.times.max()) > 1.0:
            raise ValueError(
                f"schedule times must lie in [0, 1] (t=1 noise, t=0 data), got {self.times.tolist()}"
            )
        self.strategies = [strategy_from_dict(s, f"strategies[{i}]") for i, s in enumerate(self.strategies)]
        if len(self.strategies) != self.steps:
            raise ValueError(
                f"need one strategy per step: {self.steps} steps ({self.steps + 1} times), "
                f"{len(self.strategies)} strategies"
            )
        if not isinstance(self.process, NoiseProcess):
            raise ValueError(f"process must be a NoiseProcess, got {type(self.process).__name__}")

    @property
    def steps(self) -> int:
        return self.times.numel() - 1

    def plan(self) -> list[StepPlan]:
        return plan(self.process, self.times, self.strategies)

    @property
    def nfe(self) -> int:
        """Model evaluations one run costs, counted from the plan."""
        return plan_nfe(self.plan())

    # ---------------------------------------------------------------- sampling
    def check_process(self, process: NoiseProcess) -> None:
        if process.config() != self.process.config():
            raise ValueError(
                f"schedule {self.name!r} was made for process {self.process.config()} but the model uses "
                f"{process.config()}; search a schedule for this model"
            )

    def sample_kwargs(self) -> dict:
        """``times`` and ``strategies`` for ``samplers.sample(..., solver="usf", **kwargs)`` (JSON-able)."""
        return {"times": self.times.tolist(), "strategies": [strategy_to_dict(s) for s in self.strategies]}

    def sample(self, model_fn, x_T: torch.Tensor, **cond) -> torch.Tensor:
        """``samplers.sample(model_fn, x_T, solver="usf", times=..., strategies=..., **cond)``."""
        self.check_process(model_fn.process)
        return sample(model_fn, x_T, solver="usf", times=self.times, strategies=self.strategies, **cond)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "process": self.process.config(),
            "times": self.times.tolist(),
            "strategies": [strategy_to_dict(s) for s in self.strategies],
            "nfe": self.nfe,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "schedule") -> SolverSchedule:
        """Rebuild and validate (format, keys, process, monotone times, one known strategy per step,
        and the stored NFE against the one counted from the plan)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(
                f"{where}: not a solver schedule (format {d.get('format')!r}, expected {FORMAT!r})"
            )
        if d.get("version") != VERSION:
            raise ValueError(
                f"{where}: unsupported schedule version {d.get('version')!r} (expected {VERSION})"
            )
        unknown = set(d) - _SCHEDULE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        missing = {"process", "times", "strategies"} - set(d)
        if missing:
            raise ValueError(f"{where}: missing keys {sorted(missing)}")
        try:
            process = process_from_config(d["process"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: bad process {d['process']!r}: {err}") from None
        times = d["times"]
        if not isinstance(times, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in times
        ):
            raise ValueError(f"{where}: times must be a list of numbers")
        if not isinstance(d["strategies"], list):
            raise ValueError(f"{where}: strategies must be a list")
        try:
            sched = cls(
                torch.tensor(times, dtype=torch.float64),
                d["strategies"],
                process,
                name=str(d.get("name", "searched")),
                info=dict(d.get("info") or {}),
            )
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if "nfe" in d and d["nfe"] != sched.nfe:
            raise ValueError(f"{where}: stored nfe {d['nfe']} differs from the plan's {sched.nfe}")
        return sched

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (a temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SolverSchedule:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"schedule file {path} not found; scripts/search_schedule.py writes one (schedule.json)"
            )
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a valid JSON schedule ({err})") from None
        return cls.from_dict(d, where=str(path))

    def __repr__(self) -> str:
        return f"SolverSchedule(name={self.name!r}, steps={self.steps}, nfe={self.nfe})"


def plan_nfe(plans: Sequence[StepPlan]) -> int:
    """Evaluations :func:`samplers.usf.integrate` makes for ``plans`` (mirrors its loop)."""
    nfe, carried, last = 0, False, len(plans) - 1
    for p in plans:
        nfe += 0 if carried else 1
        carried = False
        nfe += len(p.stages)
        if p.corrector is not None and (p.corrector_kind == "implicit" or p.index < last):
            nfe += 1
            carried = p.corrector_kind == "pseudo"
    return nfe


def baseline_schedule(
    process: NoiseProcess,
    solver: str,
    nfe: int,
    t_start: float = 1.0,
    t_end: float = 1e-3,
    schedule: str = "logsnr",
) -> SolverSchedule:
    """The named solver at exactly ``nfe`` evaluations, as a schedule (its default options:
    ``lower_order_final``, the solver's corrector), on the ``schedule`` grid; it reproduces
    ``sample(mf, x_T, solver, steps=..., schedule=..., t_start=..., t_end=...)``."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    for steps in range(1, int(nfe) + 1):
        times = get_times(process, schedule, steps, t_start, t_end)
        sched = SolverSchedule(times, solver_strategies(solver, steps), process, name=solver)
        if sched.nfe == nfe:
            return sched
    raise ValueError(f"solver {solver!r} cannot spend exactly {nfe} evaluations")


# ------------------------------------------------------------------ scores
class ReferenceScore:
    """RMSE between samples and a fixed reference solution from the same noise (lower is better)."""

    def __init__(self, reference: torch.Tensor, description: str = "reference"):
        self.reference = reference.detach().to(torch.float64)
        self.description = description

    def __call__(self, x: torch.Tensor) -> float:
        if x.shape != self.reference.shape:
            raise ValueError(
                f"samples {tuple(x.shape)} do not match the reference {tuple(self.reference.shape)}"
            )
        return float(((x.detach().to(torch.float64) - self.reference) ** 2).mean().sqrt())


def reference_score(
    model_fn,
    x_T_calib: torch.Tensor,
    cond: dict | None = None,
    ref_solver: str = "unipc_bh2",
    ref_steps: int = 100,
    t_start: float = 1.0,
    t_end: float = 1e-3,
) -> ReferenceScore:
    """Distance-to-teacher proxy: RMSE to ``ref_solver`` with ``ref_steps`` steps (logSNR grid)
    from the same noise ``x_T_calib`` over the same interval [t_end, t_start]."""
    with torch.no_grad():
        ref = sample(
            model_fn, x_T_calib, ref_solver, steps=ref_steps, t_start=t_start, t_end=t_end, **(cond or {})
        )
    if not bool(torch.isfinite(ref).all()):
        raise ValueError(f"the reference solution ({ref_solver}, {ref_steps} steps) is not finite")
    return ReferenceScore(ref, f"RMSE to {ref_solver} with {ref_steps} steps")


# ------------------------------------------------------------------ search
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


class _Rng:
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


class _Space:
    """Random candidates, mutation and crossover at a fixed NFE in lambda coordinates."""

    def __init__(self, process, nfe, t_start, t_end, cfg: SearchConfig, rng: _Rng):
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
            r.choice(PREDICTIONS), 1 + r.randint(min(3, i + 1)), r.choice(COEFS), r.choice(self.correctors)
        )

    def mutate_strategy(self, s: Strategy, i: int) -> Strategy:
        r, p = self.rng, self.cfg.decision_prob
        if r.uniform() < p:
            s = replace(s, prediction=r.choice(PREDICTIONS))
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


def schedule_key(sched: SolverSchedule) -> str:
    """A canonical key: two schedules with the same key compute the same samples up to round-off
    (decisions that have no effect in the plan — coefficients of steps without nodes, dpm = bh2 for
    one node, a pseudo corrector on the last step, orders lowered by short history — are normalised)."""
    rows = []
    for p in sched.plan():
        s = p.strategy
        n_pred = p.order_used - 1 if p.strategy.singlestep is None else 1
        sizes = {n_pred} | ({n_pred + 1} if p.corrector is not None else set())
        coef = s.coef
        if coef == "dpm" and 2 not in sizes:
            coef = "bh2"  # identical single-node coefficient h phi_1 / 2
        if coef in ("bh1", "bh2") and 1 not in sizes:
            coef = "taylor"
        runs = p.corrector_kind == "implicit" or p.index < sched.steps - 1  # pseudo on the last step: skipped
        corrector = p.corrector_kind if runs else None
        rows.append((s.prediction, p.order_used, coef, corrector, s.nodes, s.singlestep))
    # 12 significant digits: a t -> lambda -> t round trip of an unmoved point is the same point
    return json.dumps([[f"{t:.12g}" for t in sched.times.tolist()], rows])


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
    rng = _Rng(gen)
    process = model_fn.process
    space = _Space(process, nfe, t_start, t_end, cfg, rng)
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
