"""StepwiseSolver: a planned solve fed one evaluation at a time equals samplers.sample's own loop.

The driver below is what a diffusers pipeline does (evaluate the model at the returned point, hand the
output back). Checked against ``samplers.sample`` / ``integrate``, which own their loop: every named
solver, with and without DualFast, on a VP and a Flow process, gives the same result bit for bit and
the same (time, point) sequence of evaluations; a schedule with every USF decision (analytical first
step, pseudo and implicit correctors, singlestep stages, extra nodes, relaxation) too; and the
evaluation list has exactly the plan's NFE.
"""

from __future__ import annotations

import pytest
import torch

from samplers import ModelFn, sample
from samplers.process import VP, DiscreteVP, Flow, as_time
from samplers.sampling import SOLVERS, build_dualfast, solver_strategies
from samplers.schedule import SolverSchedule, plan_nfe
from samplers.schedules import get_times
from samplers.stepwise import StepwiseSolver, evaluations
from samplers.usf import Strategy, plan


def recording_model_fn(process, prediction: str):
    """A smooth nonlinear network; ``calls`` records (t, x) of every evaluation."""
    calls = []

    def net(x, t):
        calls.append((float(t[0]), x.clone()))
        tt = as_time(t).reshape(-1, *([1] * (x.ndim - 1)))
        return 0.7 * torch.tanh(1.3 * x) + 0.2 * x * tt + 0.05 * torch.sin(3 * tt)

    return ModelFn(net, process, prediction), calls


def drive(mf: ModelFn, x_T: torch.Tensor, solver: StepwiseSolver) -> torch.Tensor:
    """The pipeline's loop: evaluate at the point returned last, feed the output back."""
    x = solver.start(x_T)
    while not solver.done:
        x = solver.advance(mf.predict(x, solver.next.t), x)
    return x


PROCESSES = {"vp": (VP(), "eps"), "flow": (Flow(), "flow")}


@pytest.mark.parametrize("kind", sorted(PROCESSES))
@pytest.mark.parametrize("dualfast", [False, True])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_fed_stepwise_equals_sample(kind, dualfast, solver):
    process, prediction = PROCESSES[kind]
    x_T = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mf, ref_calls = recording_model_fn(process, prediction)
    ref = sample(mf, x_T, solver=solver, steps=6, dualfast=dualfast)

    plans = plan(process, get_times(process, "logsnr", 6), solver_strategies(solver, 6))
    df = build_dualfast(dualfast, 6, process)
    mf2, calls = recording_model_fn(process, prediction)
    out = drive(mf2, x_T, StepwiseSolver(plans, df.modify if df is not None else None))

    assert torch.equal(out, ref)
    assert [t for t, _ in calls] == [t for t, _ in ref_calls]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(calls, ref_calls, strict=True))
    assert len(evaluations(plans)) == plan_nfe(plans) == mf2.nfe


def every_decision(process) -> SolverSchedule:
    """Six steps using every USF decision: afs, pseudo and implicit correctors, singlestep stages, more
    nodes than derivative terms, relaxation, both prediction forms."""
    strategies = [
        Strategy("data", 1, afs=(0.1, -0.2)),  # per-channel x0 guess instead of the first evaluation
        Strategy("data", 2, "bh2", corrector="pseudo", relax=0.2),
        Strategy("noise", 2, "dpm", singlestep=(0.5,)),
        Strategy("data", 3, "taylor", corrector="implicit", nodes=(1, 2, 3)),
        Strategy("noise", 2, "bh1", corrector="pseudo"),
        Strategy("data", 2, "bh2", corrector="pseudo"),  # a pseudo corrector on the last step is skipped
    ]
    return SolverSchedule(get_times(process, "logsnr", 6), strategies, process)


@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_every_usf_decision_fed_stepwise_equals_the_schedule(kind):
    process, prediction = PROCESSES[kind]
    sched = every_decision(process)
    x_T = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mf, ref_calls = recording_model_fn(process, prediction)
    ref = sched.sample(mf, x_T)

    mf2, calls = recording_model_fn(process, prediction)
    solver = StepwiseSolver(sched.plan())
    out = drive(mf2, x_T, solver)
    assert torch.equal(out, ref)
    assert [t for t, _ in calls] == [t for t, _ in ref_calls]
    # afs: no evaluation at t_0; the stage of step 2; step 3's implicit corrector evaluates at t_4, which
    # step 4 evaluates again; the last step's pseudo corrector does not run
    roles = [(c.step, c.role) for c in solver.calls]
    assert roles == [
        (1, "start"),
        (1, "corrector"),
        (2, "stage"),
        (3, "start"),
        (3, "corrector"),
        (4, "start"),
        (4, "corrector"),
    ]
    assert len(solver.calls) == sched.nfe == mf2.nfe == 7


def test_denoise_final_is_one_more_evaluation_returning_x0():
    process, prediction = PROCESSES["vp"]
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mf, _ = recording_model_fn(process, prediction)
    ref = sample(mf, x_T, solver="dpmpp_2m", steps=4, denoise_final=True)
    plans = plan(process, get_times(process, "logsnr", 4), solver_strategies("dpmpp_2m", 4))
    solver = StepwiseSolver(plans, denoise_final=True)
    mf2, _ = recording_model_fn(process, prediction)
    assert torch.equal(drive(mf2, x_T, solver), ref)
    assert solver.calls[-1].role == "final" and mf2.nfe == 5


def test_misuse_is_refused():
    process, _ = PROCESSES["vp"]
    plans = plan(process, get_times(process, "logsnr", 2), solver_strategies("ddim", 2))
    solver = StepwiseSolver(plans)
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="call start"):
        solver.advance(None, x)
    solver.start(x)
    with pytest.raises(RuntimeError, match="already called"):
        solver.start(x)
    mf, _ = recording_model_fn(process, "eps")
    for _ in range(2):
        x = solver.advance(mf.predict(x, solver.next.t), x)
    with pytest.raises(RuntimeError, match="all 2 evaluations were fed"):
        _ = solver.next
    with pytest.raises(ValueError, match="at least one step"):
        StepwiseSolver([])


def test_discrete_vp_reaches_the_data_at_t0():
    """diffusers' runs end at timestep -1 (alphas_cumprod = 1): DiscreteVP has alpha(0) = 1, sigma(0) = 0,
    lambda(0) = +inf and a finite sigma everywhere below its first training point (the linear
    extrapolation it had before gave alpha > 1 there: sigma was NaN at t = 0)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    p = DiscreteVP(torch.cumprod(1 - betas, 0))
    t = torch.tensor([0.0, 2e-4, 5e-4, 1e-3], dtype=torch.float64)
    assert p.alpha(t)[0].item() == 1.0 and p.sigma(t)[0].item() == 0.0
    assert p.lambda_(t)[0].item() == float("inf")
    assert bool((p.alpha(t) <= 1).all()) and bool(torch.isfinite(p.sigma(t)).all())
    assert bool((p.sigma(t)[1:] > 0).all()) and bool((p.sigma(t)[1:].diff() > 0).all())
    assert p.t_of_lambda(torch.tensor(float("inf"), dtype=torch.float64)).item() == 0.0
    # the training points are untouched: t = (k + 1) / N has alphas_cumprod[k]
    k = torch.tensor([0, 499, 999])
    assert torch.allclose(p.alpha((k + 1).double() / 1000) ** 2, p.alphas_cumprod[k], rtol=1e-12, atol=0)
