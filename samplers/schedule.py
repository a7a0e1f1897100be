"""The S³ solver-schedule file: a decreasing time grid plus one USF strategy per step, as JSON.

A :class:`SolverSchedule` is what :mod:`samplers.search` finds and what ``scripts/sample.py
schedule_file=...`` runs: every step s -> t is the exponential-integrator update of
:mod:`samplers.usf` with that step's :class:`~samplers.usf.Strategy` (Liu et al., USF / S³,
arXiv 2312.07243). The file format (``schedule.json``), version 2::

    {"format": "difftools.solver_schedule", "version": 2,
     "name": "searched",                          # or the baseline solver's name
     "process": {"kind": "VP", ...},              # NoiseProcess.config() the times refer to
     "times": [1.0, ..., 0.001],                  # t_0 > ... > t_N, in [0, 1] (t = 1 noise); t_N = t_end
     "strategies": [{"prediction": "data", "order": 2, "coef": "bh2", "corrector": "pseudo",
                     "nodes": null, "singlestep": null, "relax": 0.0, "afs": null}, ...],  # N of them
     "nfe": 5,                                    # checked against the count from the plan
     "info": {...}}                               # free-form: search settings, scores

Version 2 added the strategy keys ``relax`` (first-derivative relaxation c, g_1 <- (1 + c h) g_1)
and ``afs`` (analytical first step: the first point's constant x0 prediction, step 0 only), and
lets ``nodes`` hold more previous evaluations than order - 1 (the derivative-estimate order).
Version 1 files (no ``relax`` / ``afs``) are read as they are: their strategies mean the same.

Reading validates everything (format and version, unknown or missing keys, the process, strictly
decreasing times in [0, 1], one known strategy per step, the stored NFE) and raises ``ValueError``
naming the file and the key; writing is atomic (:mod:`samplers.atomic`). The ``format`` tag keeps
the name it was first written with, so older files stay readable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from samplers.atomic import write_text_atomic
from samplers.process import NoiseProcess, process_from_config
from samplers.sampling import SOLVERS, sample, solver_strategies
from samplers.schedules import check_times, get_times
from samplers.usf import StepPlan, Strategy, plan

FORMAT = "difftools.solver_schedule"
VERSION = 2
#: strategy keys per file version (each version reads files of its own and earlier versions)
STRATEGY_KEYS_V1 = ("prediction", "order", "coef", "corrector", "nodes", "singlestep")
STRATEGY_KEYS = (*STRATEGY_KEYS_V1, "relax", "afs")
READABLE_VERSIONS = {1: STRATEGY_KEYS_V1, 2: STRATEGY_KEYS}
SCHEDULE_KEYS = frozenset({"format", "version", "name", "process", "times", "strategies", "nfe", "info"})


def strategy_to_dict(s: Strategy) -> dict:
    return {
        "prediction": s.prediction,
        "order": int(s.order),
        "coef": s.coef,
        "corrector": s.corrector,
        "nodes": None if s.nodes is None else [int(j) for j in s.nodes],
        "singlestep": None if s.singlestep is None else [float(r) for r in s.singlestep],
        "relax": float(s.relax),
        "afs": None if s.afs is None else [float(v) for v in s.afs],
    }


def strategy_from_dict(d, where: str = "strategy", keys: Sequence[str] = STRATEGY_KEYS) -> Strategy:
    """A :class:`Strategy` from its dict, with a clear error for unknown keys or values (``keys``:
    the keys the file's version allows)."""
    if isinstance(d, Strategy):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
    unknown = set(d) - set(keys)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {list(keys)}")
    d = dict(d)
    if not isinstance(d.get("order", 1), int) or isinstance(d.get("order", 1), bool):
        raise ValueError(f"{where}: order must be an integer, got {d.get('order')!r}")
    for key in ("nodes", "singlestep", "afs"):
        if d.get(key) is not None:
            if not isinstance(d[key], (list, tuple)):
                raise ValueError(f"{where}: {key} must be a list or null, got {d[key]!r}")
            d[key] = tuple(d[key])
    if d.get("nodes") is not None and not all(
        isinstance(j, int) and not isinstance(j, bool) and j >= 1 for j in d["nodes"]
    ):
        raise ValueError(f"{where}: nodes must be positive integers, got {list(d['nodes'])}")
    for key in ("relax", "afs"):
        values = [d[key]] if key == "relax" and key in d else list(d.get(key) or ())
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{where}: {key} must hold numbers, got {d[key]!r}")
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
        version = d.get("version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ValueError(
                f"{where}: unsupported schedule version {version!r} (this reader knows "
                f"{sorted(READABLE_VERSIONS)}; a newer difftools wrote it?)"
            )
        unknown = set(d) - SCHEDULE_KEYS
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
        keys = READABLE_VERSIONS[version]
        strategies = [
            strategy_from_dict(st, f"{where}: strategies[{i}]", keys) for i, st in enumerate(d["strategies"])
        ]
        try:
            sched = cls(
                torch.tensor(times, dtype=torch.float64),
                strategies,
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
        """Write the JSON file atomically (:func:`samplers.atomic.write_text_atomic`)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

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
        nfe += 0 if (carried or p.afs is not None) else 1
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


def schedule_key(sched: SolverSchedule) -> str:
    """A canonical key: two schedules with the same key compute the same samples up to round-off
    (decisions that have no effect in the plan are normalised: coefficients of steps without derivative
    terms, dpm = bh2 for one term, a pseudo corrector on the last step, orders lowered by short
    history, nodes not yet available, a relaxation of a step without a first derivative)."""
    rows = []
    for p in sched.plan():
        s = p.strategy
        single = s.singlestep is not None
        m_pred = 1 if single else p.order_used - 1  # derivative terms of the predictor
        runs = p.corrector_kind == "implicit" or p.index < sched.steps - 1  # pseudo on the last step: skipped
        corrector = p.corrector_kind if (p.corrector is not None and runs) else None
        sizes = {m_pred} | ({m_pred + 1} if corrector else set())
        coef = s.coef
        if coef == "dpm" and 2 not in sizes:
            coef = "bh2"  # identical one-term coefficient h phi_1 / 2
        if coef in ("bh1", "bh2") and 1 not in sizes:
            coef = "taylor"
        relax = f"{float(s.relax):.12g}" if m_pred >= 1 else "0"
        nodes = list(p.nodes_used) if m_pred >= 1 and not single else None
        afs = None if p.afs is None else [f"{v:.12g}" for v in p.afs[0]]
        rows.append((s.prediction, p.order_used, nodes, coef, corrector, relax, s.singlestep, afs))
    # 12 significant digits: a t -> lambda -> t round trip of an unmoved point is the same point
    return json.dumps([[f"{t:.12g}" for t in sched.times.tolist()], rows])
