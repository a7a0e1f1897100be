"""A planned solve driven one model evaluation at a time: the inverse of control a diffusers scheduler needs.

:func:`samplers.usf.integrate` owns its loop and calls the model. A diffusers pipeline owns the loop
instead: it evaluates the model at the point the scheduler last returned and hands the output back
(``scheduler.step(model_output, timestep, sample)``). :class:`StepwiseSolver` runs the same plans
(:func:`samplers.usf.plan`) that way, so that the sequence of evaluations, (point, time) after
(point, time), and the result equal ``integrate``'s::

    solver = StepwiseSolver(plans, modifier)
    x = solver.start(x_T)                         # steps that need no evaluation (an analytical first step)
    while not solver.done:
        t = solver.next.t
        x = solver.advance(model_fn.predict(x, t), x)   # the next point to evaluate, or the result

Each grid step s -> t costs the evaluations :func:`evaluations` lists: its first point (``start``,
unless the previous step's pseudo corrector already evaluated there, or the step is an analytical
first step), one per singlestep stage (``stage``), one for a corrector that runs (``corrector``: an
implicit one always, a pseudo one except on the last step), and with ``denoise_final`` one at the
last grid time (``final``, whose x0 is the result). A pseudo (UniC) corrector's evaluation is at the
predictor's output and serves two purposes, as in ``integrate``: it corrects the step that made that
point, and it is the next step's evaluation, taken at the corrected state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samplers.process import Denoised
from samplers.usf import PredictionModifier, StepPlan, analytic_prediction, apply_update

ROLES = ("start", "stage", "corrector", "final")


@dataclass(frozen=True)
class Evaluation:
    """One model evaluation of a planned run: at time ``t``, for grid step ``step``, as ``role``
    (``start`` | ``stage`` | ``corrector`` | ``final``; ``stage`` is the stage's index for ``stage``)."""

    t: float
    step: int
    role: str
    stage: int = 0


def _corrector_runs(p: StepPlan, n: int) -> bool:
    # integrate: an implicit corrector always evaluates; a pseudo one not on the last step (no next step
    # would reuse its evaluation)
    return p.corrector is not None and (p.corrector_kind == "implicit" or p.index < n - 1)


def evaluations(plans: list[StepPlan], denoise_final: bool = False) -> list[Evaluation]:
    """The model evaluations of ``plans`` in the order :func:`samplers.usf.integrate` makes them
    (their number is :func:`samplers.schedule.plan_nfe`, plus one with ``denoise_final``)."""
    out: list[Evaluation] = []
    carried = False
    for p in plans:
        if p.afs is None and not carried:
            out.append(Evaluation(p.t_s, p.index, "start"))
        carried = False
        out.extend(Evaluation(stage.t_out, p.index, "stage", k) for k, stage in enumerate(p.stages))
        if _corrector_runs(p, len(plans)):
            out.append(Evaluation(p.t_t, p.index, "corrector"))
            carried = p.corrector_kind == "pseudo"
    if denoise_final and plans:
        out.append(Evaluation(plans[-1].t_t, len(plans), "final"))
    return out


class StepwiseSolver:
    """Run ``plans`` one evaluation at a time (module docstring); ``modifier`` as in ``integrate`` (DualFast).

    Attributes:
        calls: the run's :class:`Evaluation` list; ``index`` counts those already fed.
        x0: the clean-sample estimate of the last evaluation fed (None before the first).
    """

    def __init__(
        self,
        plans: list[StepPlan],
        modifier: PredictionModifier | None = None,
        denoise_final: bool = False,
    ):
        if not plans:
            raise ValueError("a run needs at least one step")
        self.plans = list(plans)
        self.modifier = modifier
        self.calls = evaluations(self.plans, denoise_final)
        self.index = 0
        self.started = False
        self.x0: torch.Tensor | None = None
        self._hist: list[Denoised] = []
        self._stage_evals: list[Denoised] = []
        self._x_s: torch.Tensor | None = None  # the current step's starting state
        self._primary: torch.Tensor | None = None  # its (possibly modified) primary prediction

    @property
    def done(self) -> bool:
        return self.started and self.index >= len(self.calls)

    @property
    def next(self) -> Evaluation:
        """The evaluation :meth:`advance` expects next."""
        if self.done:
            raise RuntimeError(f"the run is complete: all {len(self.calls)} evaluations were fed")
        return self.calls[self.index]

    def start(self, x_T: torch.Tensor) -> torch.Tensor:
        """Begin at x_T (the state at the first grid time): returns the first point to evaluate, which
        is x_T unless step 0 is an analytical first step (then the point that step leads to)."""
        if self.started:
            raise RuntimeError("start() was already called; make a new StepwiseSolver for a new run")
        self.started = True
        first = self.plans[0]
        if first.afs is None:
            return x_T
        return self._begin(first, x_T, analytic_prediction(x_T, *first.afs))

    def advance(self, den: Denoised, x: torch.Tensor) -> torch.Tensor:
        """Feed the evaluation ``den`` made at point ``x`` (the point returned last, as the caller holds
        it); returns the next point to evaluate, or the result once :attr:`done`."""
        if not self.started:
            raise RuntimeError("call start(x_T) before advance()")
        call = self.next
        self.index += 1
        self.x0 = den.x0
        if call.role == "final":
            return den.x0
        p = self.plans[call.step]
        if call.role == "start":
            return self._begin(p, x, den)
        if call.role == "stage":
            self._stage_evals.append(den)
            return self._after_stages(p)
        x_next = apply_update(p.corrector, self._x_s, self._primary, self._hist, self._stage_evals, den)
        if p.corrector_kind == "pseudo":
            # UniC: this evaluation, made at the predictor's output, is the next step's (0 NFE)
            return self._begin(self.plans[p.index + 1], x_next, den)
        return x_next

    # ------------------------------------------------------------------ one step
    def _begin(self, p: StepPlan, x: torch.Tensor, den: Denoised) -> torch.Tensor:
        self._hist.append(den)
        self._x_s, self._stage_evals = x, []
        primary = getattr(den, p.predictor.primary)
        if self.modifier is not None:
            primary = self.modifier(den, x, p.t_s, p.index, p.predictor.primary)
        self._primary = primary
        return self._after_stages(p)

    def _after_stages(self, p: StepPlan) -> torch.Tensor:
        """The next singlestep stage's point, or once all stages are evaluated the predictor's output
        (the step's result, or the point its corrector evaluates)."""
        k = len(self._stage_evals)
        if k < len(p.stages):
            return apply_update(p.stages[k], self._x_s, self._primary, self._hist, self._stage_evals, None)
        return apply_update(p.predictor, self._x_s, self._primary, self._hist, self._stage_evals, None)
