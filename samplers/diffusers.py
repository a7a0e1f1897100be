"""``USFScheduler``: our solvers, DualFast and S³ schedule files inside an unmodified diffusers pipeline.

::

    from samplers.diffusers import USFScheduler
    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, solver="unipc_bh2", dualfast=True)
    images = pipe(..., num_inference_steps=6).images

``from_config`` keeps the pipeline scheduler's config as ``source_config``; the process, the
network's prediction type and its timestep convention come from it exactly as for
:func:`samplers.adapters.from_diffusers` (VP schedulers with betas: ``DiscreteVP`` with training
index k at t = (k + 1) / N, the network called with timestep N t - 1; flow matching: ``Flow`` with
t = sigma and timestep N t, the output a velocity). So the pipeline's output with this scheduler
equals ``samplers.sample(from_diffusers(model, source_config), x_T, solver, steps=n, ...)`` with the
pipeline's initial noise x_T and the same options.

How a multistep solver becomes a diffusers scheduler. A pipeline calls the model once per entry of
``scheduler.timesteps`` at the point ``step`` returned last, then calls ``step(model_output,
timestep, sample)``. ``timesteps`` therefore lists every evaluation of the run
(:func:`samplers.stepwise.evaluations`) in order, and :class:`~samplers.stepwise.StepwiseSolver`
turns each output into the next point to evaluate: one entry per step for DDIM, Euler, DPM-Solver(++)
multistep and UniPC (UniC's corrector reuses the next step's evaluation), two per step for Heun (the
implicit corrector's evaluation is at the next grid time, so that time appears twice), 1 + r per step
for singlestep solvers with r stages (the stage times appear between the grid times), and for a
schedule file whatever its per-step decisions cost (``nfe`` in the file). ``num_inference_steps``
counts grid steps, as ``steps`` of :func:`samplers.sample`; ``len(scheduler.timesteps)`` is the NFE.

Grids (``schedule``): our named schedules (``logsnr`` default, ``karras``, ``uniform_t``,
``quadratic``) from ``t_start`` to ``t_end``, as :func:`samplers.sample`; or ``"diffusers"``: the
evaluation timesteps the source scheduler itself would use (its ``timestep_spacing``, ``shift``,
dynamic shifting ``mu``, custom ``sigmas`` / ``timesteps`` from the pipeline) and its final point
(``final_sigmas_type`` / ``set_alpha_to_one``: sigma = 0 is t = 0, where the last step returns the
data prediction). Consecutive repeated source timesteps (Heun-type schedulers) count once.

Not expressible here: hooks that evaluate the model themselves (``lml=``; ``momentum=`` is not offered
either), and the analytical first step (``afs``) of a schedule file in a pipeline that does not pass
the model input through ``scale_model_input`` (DDPMPipeline, the flow-matching pipelines): that step
replaces the evaluation at the initial noise, so the first evaluation is at a point the pipeline never
holds; ``step`` raises there. Differences from the source scheduler that are the point: no x0
clipping or thresholding (``clip_sample`` / ``thresholding`` of the source config are not applied; a
warning says so), and no stochastic (``eta`` / SDE) steps.

diffusers is imported when ``USFScheduler`` is first used (this module's ``__getattr__``), so
``import samplers.diffusers`` works with torch alone.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch

from samplers.adapters import SchedulerProcess, scheduler_process, source_class_name
from samplers.process import Denoised, DiscreteVP, Flow, NoiseProcess
from samplers.sampling import SOLVERS, build_dualfast, solver_strategies
from samplers.schedule import SolverSchedule
from samplers.schedules import SCHEDULES, check_times, get_times
from samplers.stepwise import StepwiseSolver, evaluations
from samplers.usf import StepPlan, plan

logger = logging.getLogger(__name__)

# USFScheduler / USFSchedulerOutput are made on first access (module __getattr__), so not listed in __all__
__all__ = ["GRIDS", "MIRRORED_KEYS", "diffusers_grid", "load_solver_schedule", "source_class_name"]

#: ``schedule`` values: our named grids (:mod:`samplers.schedules`) or the source scheduler's own
GRIDS = (*SCHEDULES, "diffusers")
#: source-config keys copied into this scheduler's config, because pipelines read them from
#: ``pipe.scheduler.config`` (resolution-dependent shift, training steps, prediction type)
MIRRORED_KEYS = (
    "num_train_timesteps",
    "prediction_type",
    "steps_offset",
    "timestep_spacing",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
)
#: config keys that are not USFScheduler's own and are dropped when reading a config back
_BOOKKEEPING = ("_use_default_values", "_diffusers_version", "_class_name")
#: max |difference| of two alphas_cumprod tables that still count as the same process (float32 rounding)
PROCESS_ATOL = 1e-6


# ------------------------------------------------------------------ the source scheduler
def _source_scheduler(source_config: dict):
    import diffusers

    name = source_config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None:
        raise ValueError(
            f"schedule='diffusers' follows the source scheduler's grid, but the source config names no "
            f"diffusers scheduler (_class_name={name!r}); build USFScheduler.from_config(pipe.scheduler) "
            "from the scheduler object, or choose a named schedule ('logsnr', 'karras', ...)"
        )
    return cls.from_config(source_config)


def _time_of(sp: SchedulerProcess, timestep: float) -> float:
    """Our t for a diffusers timestep value: timestep = scale t + shift (samplers.adapters)."""
    return (float(timestep) - sp.timestep_shift) / sp.timestep_scale


def _final_time(source, sp: SchedulerProcess, n_evals: int) -> float:
    """Where the source scheduler's last step lands: t = 0 (sigma = 0, alphas_cumprod = 1) or the
    training schedule's first point (``final_sigmas_type="sigma_min"``, ``set_alpha_to_one=False``)."""
    process = sp.process
    final_ac = getattr(source, "final_alpha_cumprod", None)  # DDIM family
    if final_ac is not None and not isinstance(process, Flow):
        a2 = float(final_ac)
        if a2 >= 1.0:
            return 0.0
        return float(process.t_of_lambda(torch.tensor(0.5 * math.log(a2 / (1.0 - a2)), dtype=torch.float64)))
    sigmas = getattr(source, "sigmas", None)
    if sigmas is not None and len(sigmas) == n_evals + 1:
        s = float(sigmas[-1])
        if isinstance(process, Flow):
            return s  # flow sigma is our t
        # VP schedulers' sigma is sigma/alpha = e^{-lambda}
        if s == 0.0:
            return 0.0
        return float(process.t_of_lambda(torch.tensor(-math.log(s), dtype=torch.float64)))
    return 0.0  # DDPM: the last step goes to timestep -1, alphas_cumprod = 1


def diffusers_grid(
    source_config: dict,
    sp: SchedulerProcess,
    num_inference_steps: int | None,
    timesteps=None,
    sigmas=None,
    mu: float | None = None,
) -> torch.Tensor:
    """The time grid (float64, decreasing) the source scheduler would run: its evaluation timesteps in
    our time (consecutive repeats once), then its final point. ``timesteps`` / ``sigmas`` / ``mu`` go to
    the source's ``set_timesteps`` (refused where it does not take them)."""
    source = _source_scheduler(source_config)
    accepted = set(inspect.signature(source.set_timesteps).parameters)
    custom = {"timesteps": timesteps, "sigmas": sigmas, "mu": mu}
    custom = {k: v for k, v in custom.items() if v is not None}
    refused = sorted(set(custom) - accepted)
    if refused:
        raise ValueError(
            f"{type(source).__name__}.set_timesteps takes no {refused}; schedule='diffusers' follows that "
            "scheduler's grid"
        )
    if num_inference_steps is not None or not custom:
        custom["num_inference_steps"] = num_inference_steps
    source.set_timesteps(**custom)
    raw = [float(k) for k in source.timesteps.tolist()]
    ks = [k for i, k in enumerate(raw) if i == 0 or k != raw[i - 1]]
    times = [_time_of(sp, k) for k in ks]
    final = _final_time(source, sp, len(raw))
    if final < times[-1]:
        times.append(final)
    # (DDIM with "leading" spacing and set_alpha_to_one=False ends where its last evaluation is: that
    # last step is the identity, and here there is no step after the last evaluation)
    try:
        return check_times(torch.tensor(times, dtype=torch.float64))
    except ValueError as err:
        raise ValueError(
            f"{type(source).__name__}'s timesteps {ks} do not form a decreasing time grid: {err}"
        ) from None


# ------------------------------------------------------------------ schedule files
def _same_process(a: NoiseProcess, b: NoiseProcess) -> tuple[bool, str]:
    if a.config() == b.config():
        return True, ""
    both_discrete = isinstance(a, DiscreteVP) and isinstance(b, DiscreteVP)
    if both_discrete and a.num_train_timesteps == b.num_train_timesteps:
        diff = float((a.alphas_cumprod - b.alphas_cumprod).abs().max())
        return diff <= PROCESS_ATOL, f"alphas_cumprod differ by up to {diff:.3g}"
    return False, ""


def load_solver_schedule(value, process: NoiseProcess) -> SolverSchedule:
    """A :class:`SolverSchedule` from a path or its dict, checked against the model's process."""
    if isinstance(value, SolverSchedule):
        sched, where = value, "solver_schedule"
    elif isinstance(value, (str, Path)):
        sched, where = SolverSchedule.load(value), str(value)
    elif isinstance(value, dict):
        sched, where = SolverSchedule.from_dict(value, where="solver_schedule"), "solver_schedule"
    else:
        raise TypeError(
            "solver_schedule must be a schedule.json path, its dict or a SolverSchedule, got "
            f"{type(value).__name__}"
        )
    same, detail = _same_process(sched.process, process)
    if not same:
        raise ValueError(
            f"{where}: schedule {sched.name!r} was made for {sched.process!r} but the pipeline's scheduler "
            f"config describes {process!r}{' (' + detail + ')' if detail else ''}; search a schedule for "
            "this model (scripts/search_schedule.py with samplers.adapters.from_diffusers)"
        )
    return sched


def _fresh_plans(process: NoiseProcess, times: torch.Tensor, strategies: list, begin: int) -> list[StepPlan]:
    """Plans of the run from grid point ``begin`` on, with a fresh history (img2img starts mid-grid)."""
    return plan(process, times[begin:], strategies[begin:])


# ------------------------------------------------------------------ the scheduler class (lazy)
_CLASS = None


def __getattr__(name: str):
    if name in ("USFScheduler", "USFSchedulerOutput"):
        cls = _scheduler_class()
        return cls if name == "USFScheduler" else cls.Output
    if name == "SchedulerMixin":
        # A saved pipeline records this scheduler as ("samplers.diffusers", "USFScheduler"); diffusers'
        # from_pretrained then looks its loading base class up in this module by name.
        return _scheduler_class().__mro__[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _scheduler_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from diffusers import ConfigMixin, SchedulerMixin
        from diffusers.configuration_utils import register_to_config
        from diffusers.utils import BaseOutput
    except ImportError as err:
        raise ImportError(
            f"samplers.diffusers.USFScheduler needs diffusers ({err}); install it (pip install diffusers) "
            "or call samplers.sample directly"
        ) from None

    from dataclasses import dataclass

    @dataclass
    class USFSchedulerOutput(BaseOutput):
        """``prev_sample``: the next point to evaluate (after the last evaluation: the result);
        ``pred_original_sample``: the x0 estimate of the evaluation just fed."""

        prev_sample: torch.Tensor
        pred_original_sample: torch.Tensor | None = None

    class USFScheduler(SchedulerMixin, ConfigMixin):
        """Any solver of :mod:`samplers` (module docstring) as a diffusers scheduler.

        Args:
            solver: a name from :data:`samplers.sampling.SOLVERS` (default ``dpmpp_2m``); ``usf`` with
                ``solver_schedule``.
            order, lower_order_final, corrector: as in :func:`samplers.sample`.
            dualfast: False, True, ``"auto"`` or a dict of :class:`~samplers.dualfast.DualFast` options.
            schedule: the grid: ``logsnr`` (default), ``karras``, ``uniform_t``, ``quadratic`` (from
                ``t_start`` to ``t_end``), or ``diffusers`` (the source scheduler's own grid).
            t_start, t_end: the named grids' ends (t = 1 noise, t = 0 data), as samplers.sample.
            denoise_final: one more evaluation at the last grid time, returning its x0 estimate.
            afs: use a schedule file's analytical first step (default). It needs a pipeline that passes
                the model input through ``scale_model_input``; False evaluates the model at the first
                grid point instead (one more NFE), for pipelines that do not.
            solver_schedule: an S³ schedule (a ``schedule.json`` path, or its dict): its grid and
                per-step strategies replace solver / schedule options; ``num_inference_steps`` must be
                its steps or its NFE. The config stores the schedule itself, so a saved pipeline carries it.
            source_config: the diffusers scheduler config the model was trained with (set by
                ``from_config``); default DDPMScheduler's defaults (linear betas, eps prediction).
        """

        _compatibles: list = []
        order = 1
        Output = USFSchedulerOutput

        @register_to_config
        def __init__(
            self,
            solver: str | None = None,
            order: int | None = None,
            lower_order_final: bool = True,
            corrector: bool | None = None,
            dualfast=False,
            schedule: str | None = None,
            t_start: float = 1.0,
            t_end: float = 1e-3,
            denoise_final: bool = False,
            afs: bool = True,
            solver_schedule=None,
            source_config: dict | None = None,
        ):
            source = dict(source_config or {"_class_name": "DDPMScheduler"})
            self._sp = scheduler_process(source)
            self.process = self._sp.process
            self.prediction = self._sp.prediction
            self._solver_schedule = None
            if solver_schedule is not None:
                if solver not in (None, "usf"):
                    raise ValueError(
                        f"solver={solver!r} and solver_schedule were both given; a schedule file fixes "
                        "every step's solver (leave solver out)"
                    )
                if schedule is not None:
                    raise ValueError(
                        f"schedule={schedule!r} and solver_schedule were both given; the schedule file "
                        "fixes the time grid"
                    )
                self._solver_schedule = load_solver_schedule(solver_schedule, self.process)
                solver = "usf"
            elif solver == "usf":
                raise ValueError("solver='usf' runs a schedule file: pass solver_schedule=<schedule.json>")
            solver = solver or "dpmpp_2m"
            schedule = schedule or ("logsnr" if self._solver_schedule is None else None)
            if solver != "usf" and solver not in SOLVERS:
                raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
            if schedule is not None and schedule not in GRIDS:
                raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(GRIDS)}")
            build_dualfast(dualfast, 1, self.process)  # validates the option now, not mid-pipeline
            if solver != "usf":  # validates order / corrector for this solver
                solver_strategies(solver, 2, order, lower_order_final, corrector)
            for key in ("clip_sample", "thresholding"):
                if source.get(key):
                    logger.warning(
                        "the source scheduler config has %s=True; USFScheduler solves the ODE without "
                        "clipping or thresholding the x0 estimate", key
                    )
            self.register_to_config(
                solver=solver,
                schedule=schedule,
                solver_schedule=None if self._solver_schedule is None else self._solver_schedule.to_dict(),
                source_config=source,
            )
            mirrored = {k: source[k] for k in MIRRORED_KEYS if k in source}
            mirrored.setdefault("num_train_timesteps", int(self._sp.timestep_scale))
            self.register_to_config(**mirrored)
            self.init_noise_sigma = 1.0
            self.timesteps: torch.Tensor | None = None
            self.num_inference_steps: int | None = None
            self._times: torch.Tensor | None = None
            self._strategies: list = []
            self._calls: list = []
            self._reset_run()

        # -------------------------------------------------------------- config
        @classmethod
        def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
            """From a diffusers scheduler's config (or the scheduler itself): the source; from a
            USFScheduler config: a copy. ``kwargs`` set USFScheduler's options."""
            if isinstance(config, ConfigMixin):
                config = {**config.config, "_class_name": type(config).__name__}
            config = dict(config or {})
            ours = config.get("_class_name") == cls.__name__ or (
                "_class_name" not in config and "source_config" in config and "solver" in config
            )
            if not ours:
                dropped = ("_use_default_values", "_diffusers_version")
                source = {k: v for k, v in config.items() if k not in dropped}
                name = source_class_name(source)
                if name is not None:
                    source["_class_name"] = name
                kwargs.setdefault("source_config", source)
                config = {}
            own = set(inspect.signature(cls.__init__).parameters) - {"self"}
            unknown = set(config) - own - set(MIRRORED_KEYS) - set(_BOOKKEEPING)
            if unknown:
                raise ValueError(f"unknown USFScheduler config keys {sorted(unknown)}")
            init = {**{k: v for k, v in config.items() if k in own}, **kwargs}
            scheduler = cls(**init)
            return (scheduler, {}) if return_unused_kwargs else scheduler

        # -------------------------------------------------------------- the grid
        def set_timesteps(
            self,
            num_inference_steps: int | None = None,
            device: str | torch.device | None = None,
            timesteps=None,
            sigmas=None,
            mu: float | None = None,
        ):
            """Plan a run of ``num_inference_steps`` grid steps; ``self.timesteps`` lists its evaluations.

            ``timesteps`` / ``sigmas`` / ``mu`` (pipelines pass them for flow models) shape the grid with
            ``schedule="diffusers"``; the named schedules ignore them (with a warning)."""
            cfg = self.config
            process = self.process
            if self._solver_schedule is not None:
                sched = self._solver_schedule
                if num_inference_steps not in (None, sched.steps, sched.nfe):
                    raise ValueError(
                        f"the solver schedule {sched.name!r} runs {sched.steps} steps ({sched.nfe} model "
                        f"evaluations), but num_inference_steps={num_inference_steps}; pass "
                        f"num_inference_steps={sched.nfe} to the pipeline"
                    )
                self._warn_ignored("the solver schedule's grid", timesteps, sigmas, mu)
                times, strategies = sched.times, list(sched.strategies)
                if not cfg.afs and strategies[0].afs is not None:
                    strategies[0] = replace(strategies[0], afs=None)
            else:
                if cfg.schedule == "diffusers":
                    times = diffusers_grid(
                        cfg.source_config, self._sp, num_inference_steps, timesteps, sigmas, mu
                    )
                else:
                    if num_inference_steps is None:
                        raise ValueError(f"schedule={cfg.schedule!r} needs num_inference_steps")
                    self._warn_ignored(f"schedule={cfg.schedule!r}", timesteps, sigmas, mu)
                    times = get_times(process, cfg.schedule, int(num_inference_steps), cfg.t_start, cfg.t_end)
                strategies = solver_strategies(
                    cfg.solver, times.numel() - 1, cfg.order, cfg.lower_order_final, cfg.corrector
                )
            self._times, self._strategies = times, strategies
            self._calls = evaluations(plan(process, times, strategies), cfg.denoise_final)
            if not self._calls:
                raise ValueError("this run evaluates the model nowhere (one analytical step); add a step")
            sp = self._sp
            values = [sp.timestep_scale * c.t + sp.timestep_shift for c in self._calls]
            self.timesteps = torch.tensor(values, dtype=torch.float64).to(dtype=torch.float32, device=device)
            self.num_inference_steps = times.numel() - 1
            self._reset_run()

        @staticmethod
        def _warn_ignored(what: str, timesteps, sigmas, mu) -> None:
            pairs = (("timesteps", timesteps), ("sigmas", sigmas), ("mu", mu))
            given = [k for k, v in pairs if v is not None]
            if given:
                logger.warning(
                    "USFScheduler ignores the pipeline's %s: %s decides the grid (schedule='diffusers' "
                    "follows the pipeline's)", ", ".join(given), what
                )

        # -------------------------------------------------------------- the run
        def _reset_run(self) -> None:
            self._step_index: int | None = None
            self._begin_index: int | None = None
            self._runner: StepwiseSolver | None = None
            self._afs_pair: tuple[torch.Tensor, torch.Tensor] | None = None
            self._x_out: torch.Tensor | None = None  # the last returned point at full precision
            self._x_out_cast: torch.Tensor | None = None  # ... as returned

        @property
        def step_index(self) -> int | None:
            """Index into ``timesteps`` of the evaluation ``step`` expects next (None before the first)."""
            return self._step_index

        @property
        def begin_index(self) -> int | None:
            return self._begin_index

        def set_begin_index(self, begin_index: int = 0) -> None:
            """Start at ``timesteps[begin_index]`` (img2img pipelines); must be where a grid step begins."""
            self._begin_index = int(begin_index)

        def _new_runner(self, begin: int) -> StepwiseSolver:
            """A fresh run from evaluation ``begin`` (a step boundary), with its own DualFast state."""
            if self._times is None:
                raise RuntimeError("call set_timesteps(...) before step()")
            grid_step = 0
            if begin > 0:
                call = self._calls[begin]
                pseudo = call.role == "corrector" and self._pseudo(call.step)
                if call.role != "start" and not pseudo:
                    raise ValueError(
                        f"timesteps[{begin}] = {float(self.timesteps[begin]):g} is a {call.role} evaluation "
                        f"inside grid step {call.step}; a run can begin only where a step begins"
                    )
                grid_step = call.step + (1 if pseudo else 0)
            plans = _fresh_plans(self.process, self._times, self._strategies, grid_step)
            df = build_dualfast(self.config.dualfast, len(plans), self.process)
            runner = StepwiseSolver(plans, df.modify if df is not None else None, self.config.denoise_final)
            if [c.t for c in runner.calls] != [c.t for c in self._calls[begin:]]:
                raise ValueError(
                    f"a run beginning at timesteps[{begin}] would evaluate elsewhere; begin at 0"
                )
            return runner

        def _pseudo(self, grid_step: int) -> bool:
            return self._strategies[grid_step].corrector == "pseudo"

        def index_for_timestep(self, timestep) -> int:
            """The evaluation index of ``timestep`` (for a time listed twice, the one where a step begins)."""
            value = float(timestep)
            listed = self.timesteps.tolist()
            hits = [i for i, v in enumerate(listed) if math.isclose(v, value, rel_tol=1e-6, abs_tol=1e-4)]
            if not hits:
                raise ValueError(
                    f"timestep {value:g} is not in this run's timesteps {listed}; call step once per entry "
                    "of scheduler.timesteps, in order"
                )
            starts = [i for i in hits if self._calls[i].role == "start"]
            return (starts or hits)[0]

        def _init_step_index(self, timestep) -> None:
            if self._step_index is None:
                begin = self._begin_index
                self._step_index = begin if begin is not None else self.index_for_timestep(timestep)

        def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
            """The model input at this evaluation: ``sample`` itself, except before the first evaluation of
            a schedule with an analytical first step, where it is the point that step leads to."""
            if self._runner is None and self._times is not None:
                if timestep is not None or self._begin_index is not None:
                    self._init_step_index(timestep)
                begin = self._step_index or 0
                if begin == 0 and self._strategies[0].afs is not None:
                    out = self._new_runner(0).start(sample.to(self._state_dtype(sample))).to(sample.dtype)
                    self._afs_pair = (sample, out)
                    return out
            return sample

        @staticmethod
        def _state_dtype(x: torch.Tensor) -> torch.dtype:
            return torch.float64 if x.dtype == torch.float64 else torch.float32

        def _evaluation_point(self, sample: torch.Tensor) -> torch.Tensor:
            """The point the model was evaluated at, at full precision: our own last output when the
            pipeline handed it back unchanged (it may hold it in a lower precision)."""
            dtype = self._state_dtype(sample)
            last, cast = self._x_out, self._x_out_cast
            if last is not None and last.dtype != sample.dtype and sample.shape == last.shape:
                if sample is cast or torch.equal(sample, cast):
                    return last
            return sample.to(dtype)

        def step(
            self,
            model_output: torch.Tensor,
            timestep,
            sample: torch.Tensor,
            generator: torch.Generator | None = None,
            return_dict: bool = True,
        ):
            """Feed the model's output at ``sample`` (the point returned last); returns the next point
            to evaluate, or after the last entry of ``timesteps`` the result. ``generator`` is unused
            (the solvers are deterministic)."""
            if self.timesteps is None:
                raise RuntimeError("call set_timesteps(...) before step()")
            self._init_step_index(timestep)
            i = self._step_index
            if i >= len(self._calls):
                raise RuntimeError(
                    f"the run's {len(self._calls)} evaluations are done; call set_timesteps for a new run"
                )
            expected = float(self.timesteps[i])
            if not math.isclose(float(timestep), expected, rel_tol=1e-6, abs_tol=1e-4):
                raise ValueError(
                    f"step() got timestep {float(timestep):g}, but evaluation {i} of this run is at "
                    f"{expected:g}; call step once per entry of scheduler.timesteps, in order"
                )
            if self._runner is None:
                x = self._start(sample, i)
            else:
                x = self._evaluation_point(sample)
            call = self._calls[i]
            if model_output.shape[1] == 2 * x.shape[1] and model_output.shape[2:] == x.shape[2:]:
                model_output = model_output[:, : x.shape[1]]  # learned variance: keep the mean prediction
            den: Denoised = self.process.to_x0_eps(model_output.to(x.dtype), x, call.t, self.prediction)
            x_next = self._runner.advance(den, x)
            self._step_index = i + 1
            out = x_next.to(sample.dtype)
            self._x_out, self._x_out_cast = x_next, out
            x0 = den.x0.to(sample.dtype)
            if not return_dict:
                return (out, x0)
            return USFSchedulerOutput(prev_sample=out, pred_original_sample=x0)

        def _start(self, sample: torch.Tensor, begin: int) -> torch.Tensor:
            """Begin the run at evaluation ``begin``; returns the point the first evaluation was made at."""
            self._runner = self._new_runner(begin)
            dtype = self._state_dtype(sample)
            afs = begin == 0 and self._runner.plans[0].afs is not None
            if afs:
                if self._afs_pair is None:
                    raise RuntimeError(
                        "this solver schedule's first step is analytical (afs): the model's first evaluation "
                        "is at the point that step leads to, which the pipeline only uses if it passes the "
                        "model input through scheduler.scale_model_input (DiTPipeline and the Stable "
                        "Diffusion pipelines do; this one does not). Build the scheduler with afs=False "
                        "(the model is then evaluated at the first grid point: one more NFE), or use a "
                        "schedule searched without afs"
                    )
                given, made = self._afs_pair
                # a pipeline steps either the model input (DiT) or its own latents (Stable Diffusion)
                x_T = given if sample is made else sample
                return self._runner.start(x_T.to(dtype))
            return self._runner.start(sample.to(dtype))

        # -------------------------------------------------------------- forward process
        def _alpha_sigma(self, timesteps, like: torch.Tensor):
            t = (torch.as_tensor(timesteps, dtype=torch.float64).flatten() - self._sp.timestep_shift)
            t = t / self._sp.timestep_scale
            if t.numel() == 1:
                t = t.expand(like.shape[0])
            shape = (-1, *([1] * (like.ndim - 1)))
            alpha = self.process.alpha(t).reshape(shape).to(device=like.device, dtype=like.dtype)
            sigma = self.process.sigma(t).reshape(shape).to(device=like.device, dtype=like.dtype)
            return alpha, sigma

        def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
            """x_t = alpha(t) x0 + sigma(t) noise at the diffusers timesteps given (one or one per sample)."""
            alpha, sigma = self._alpha_sigma(timesteps, original_samples)
            return alpha * original_samples + sigma * noise

        def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
            """Flow-matching pipelines' name for :meth:`add_noise` (argument order of
            ``FlowMatchEulerDiscreteScheduler.scale_noise``)."""
            return self.add_noise(sample, noise, timestep)

        def __len__(self) -> int:
            return int(self.config.num_train_timesteps)

    USFScheduler.__module__ = USFSchedulerOutput.__module__ = __name__
    USFScheduler.__qualname__ = "USFScheduler"
    USFSchedulerOutput.__qualname__ = "USFSchedulerOutput"
    _CLASS = USFScheduler
    return _CLASS
