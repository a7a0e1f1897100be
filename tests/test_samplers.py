"""Accuracy and API tests of samplers.sample on the Gaussian-mixture harness (float64).

Measured order of convergence = slope of log(max error) vs log(steps) against the exact ODE
solution, in each solver's asymptotic range (40 -> 120 steps); within 0.3 of theory. Note that
DPM-Solver(++) 3M as published (and in diffusers) halves the exact phi_3 coefficient of its
second-derivative term, so its global order is 2 (the exact-Taylor ``usf`` 3rd order is 3).
"""

from __future__ import annotations

import math

import pytest
import torch

from difftools.process import EDM, VP, Flow
from samplers import ModelFn, sample
from samplers.sampling import SOLVERS, solver_strategies
from samplers.usf import Strategy, phi
from tests.mixture import make_class_mixture, make_mixture

ORDERS = {
    "ddim": 1,
    "euler": 1,
    "heun": 2,
    "dpmpp_2m": 2,
    "dpmpp_3m": 2,
    "dpm_solver_2m": 2,
    "dpm_solver_3m": 2,
    "dpmpp_2s": 2,
    "dpm_solver_2": 2,
    "dpm_solver_3": 3,
    "unipc_bh1": 3,
    "unipc_bh2": 3,
    "usf_taylor3": 3,
}
STEPS = (40, 120)


@pytest.fixture(scope="module", params=["vp", "flow"])
def setup(request):
    mix = make_mixture(dim=2, num_components=3, std=0.5, radius=1.0)
    process, t_start = (VP(), 1.0) if request.param == "vp" else (Flow(), 0.99)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(16, 2, generator=g, dtype=torch.float64) * process.sigma(torch.tensor(t_start)).item()
    ref = mix.ode_reference(process, x_T, t_start, 1e-3)
    return mix, process, t_start, x_T, ref


def _run(mf, x_T, solver, steps, t_start):
    if solver == "usf_taylor3":
        return sample(
            mf,
            x_T,
            solver="usf",
            steps=steps,
            t_start=t_start,
            strategies=[Strategy("data", 3, "taylor")] * steps,
        )
    return sample(mf, x_T, solver=solver, steps=steps, t_start=t_start, lower_order_final=False)


@pytest.mark.parametrize("solver", sorted(ORDERS))
def test_order_of_convergence(setup, solver):
    mix, process, t_start, x_T, ref = setup
    mf = mix.model_fn(process)
    errs = [(_run(mf, x_T, solver, n, t_start) - ref).abs().max().item() for n in STEPS]
    slope = math.log(errs[0] / errs[1]) / math.log(STEPS[1] / STEPS[0])
    assert abs(slope - ORDERS[solver]) <= 0.3, (solver, errs, slope)


def test_flow_from_t1_is_finite_and_matches_reference():
    mix = make_mixture(dim=2, num_components=3, std=0.5, radius=1.0)
    process = Flow()
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = mix.ode_reference(process, x_T, 1.0, 1e-3)
    # tolerances: a few times each solver's error at 100 steps from t = 0.99 (see the order test)
    for solver, tol in (
        ("ddim", 0.08),
        ("heun", 8e-3),
        ("dpmpp_2m", 8e-3),
        ("unipc_bh2", 1e-3),
        ("dpm_solver_3", 1e-4),
    ):
        for schedule in ("logsnr", "uniform_t"):
            x = sample(mix.model_fn(process), x_T, solver=solver, steps=100, schedule=schedule)
            assert torch.isfinite(x).all()
            assert (x - ref).abs().max().item() < tol, (solver, schedule)


def test_edm_and_prediction_types():
    """EDM works, and every prediction type gives the same result (exact conversions)."""
    mix = make_mixture(dim=2, num_components=3, std=0.5, radius=1.0)
    process = EDM()
    x_T = 80.0 * torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = mix.ode_reference(process, x_T, 1.0, process.t_min, rtol=1e-9, atol=1e-9)
    outs = {
        p: sample(mix.model_fn(process, prediction=p), x_T, "unipc_bh2", steps=40, t_end=process.t_min)
        for p in ("x0", "eps", "v", "flow")
    }
    assert (outs["x0"] - ref).abs().max().item() < 5e-3
    for p in ("eps", "v", "flow"):
        assert (outs[p] - outs["x0"]).abs().max().item() < 1e-9, p


def test_nfe_equals_calls_and_determinism():
    mix = make_mixture()
    process = VP()
    calls = {"n": 0}
    net = mix.denoiser(process)

    def counted(x, t, y=None):
        calls["n"] += 1
        return net(x, t, y=y)

    expected = {"ddim": 7, "dpmpp_3m": 7, "unipc_bh2": 7, "heun": 14, "dpm_solver_3": 21, "dpmpp_2s": 14}
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for solver, nfe in expected.items():
        calls["n"] = 0
        mf = ModelFn(counted, process, "x0")
        a = sample(mf, x_T, solver=solver, steps=7)
        assert mf.nfe == calls["n"] == nfe, solver
        b = sample(mf.reset(), x_T, solver=solver, steps=7)
        assert torch.equal(a, b)
    mf = ModelFn(counted, process, "x0")
    sample(mf, x_T, "ddim", steps=5, denoise_final=True)
    assert mf.nfe == 6


def test_state_dtype_with_bf16_model():
    mix = make_mixture()
    process = VP()
    net = mix.denoiser(process)
    mf = ModelFn(lambda x, t: net(x, t).to(torch.bfloat16), process, "x0")
    seen = []
    x_T = torch.randn(4, 2)
    out = sample(mf, x_T, "dpmpp_2m", steps=6, callback=lambda d: seen.append(d["x"].dtype))
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}
    ref = sample(mix.model_fn(process), x_T.double(), "dpmpp_2m", steps=6)
    assert (out.double() - ref).abs().max().item() < 0.05  # bf16 model rounding only


def test_callback_and_generic_hook():
    mix = make_mixture()
    process = VP()
    x_T = torch.randn(4, 2, dtype=torch.float64)

    class Shrink:
        def __init__(self):
            self.calls, self.resets = [], 0

        def reset(self):
            self.resets += 1

        def __call__(self, model_fn, x_prev, x_next, t_prev, t_next, step_index, cond):
            self.calls.append((step_index, t_prev, t_next))
            return x_next * 0.5 if step_index == 2 else x_next

    hook = Shrink()
    steps = []
    out = sample(mix.model_fn(process), x_T, "ddim", steps=4, hooks=[hook], callback=steps.append)
    assert hook.resets == 1 and [c[0] for c in hook.calls] == [0, 1, 2, 3]
    assert [d["i"] for d in steps] == [0, 1, 2, 3]
    assert steps[0]["t"] == 1.0 and abs(steps[-1]["t_next"] - 1e-3) < 1e-15
    assert torch.equal(steps[3]["x"], steps[2]["x_next"]) and torch.equal(out, steps[3]["x_next"])
    plain = sample(mix.model_fn(process), x_T, "ddim", steps=4)
    assert (out - plain).abs().max().item() > 1e-3  # the hook's change propagates


def test_class_conditional_harness():
    mix = make_class_mixture(num_classes=10, dim=2)
    process = VP()
    y = torch.arange(10)
    x_T = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(mix.model_fn(process), x_T, "unipc_bh2", steps=20, denoise_final=True, y=y)
    nearest = torch.cdist(x, mix.means).argmin(1)
    assert torch.equal(nearest, y)


def test_phi_functions():
    for z in (-3.0, -0.3, 1e-4, 0.4, 2.0):
        assert math.isclose(phi(1, z), math.expm1(z) / z, rel_tol=1e-12)
        assert math.isclose(phi(2, z), (math.expm1(z) - z) / z**2, rel_tol=1e-7)
    assert phi(1, -math.inf) == 0.0


def test_usf_strategy_list_equals_named_solvers():
    mix = make_mixture()
    process = VP()
    mf = mix.model_fn(process)
    x_T = torch.randn(4, 2, dtype=torch.float64)
    named = sample(mf, x_T, "dpmpp_2m", steps=6, lower_order_final=False)
    usf = sample(mf, x_T, "usf", steps=6, strategies=[dict(prediction="data", order=2, coef="bh2")] * 6)
    assert (named - usf).abs().max().item() < 1e-12
    mixed = sample(
        mf,
        x_T,
        "usf",
        steps=6,
        strategies=[Strategy("noise", 1)] + [Strategy("data", 3, "taylor", "pseudo")] * 5,
    )
    assert torch.isfinite(mixed).all() and (mixed - named).abs().max().item() > 1e-6


@pytest.mark.parametrize(("solver", "max_state_ops"), [("ddim", 5), ("dpmpp_2m", 7), ("unipc_bh2", 11)])
def test_step_launches_only_state_sized_ops(solver, max_state_ops):
    """Per step, the loop works on the state only: no per-sample coefficient tensors ([B]-shaped
    ops, which on CUDA are tiny kernel launches each) and a bounded number of state-sized ops
    (counts from a VP eps model: the conversion x0 = (x - sigma eps)/alpha plus the update)."""
    batch, steps = 3, 10
    x = torch.randn(batch, 4, 8, 8)
    out = torch.randn(batch, 4, 8, 8)
    mf = ModelFn(lambda x_t, t: out, VP(), "eps")
    sample(mf, x, solver, steps=steps)  # warm the memoised grid coefficients
    with torch.profiler.profile(record_shapes=True) as prof:
        sample(mf, x, solver, steps=steps)
    per_sample_ops, state_ops = [], 0
    for e in prof.events():
        top = e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
        if not (e.name.startswith("aten::") and top):
            continue
        shapes = [sh for sh in (e.input_shapes or []) if isinstance(sh, list)]
        if [batch] in shapes:
            per_sample_ops.append(e.name)
        elif any(len(sh) == 4 for sh in shapes) and e.name != "aten::to":  # .to(same dtype) is a no-op
            state_ops += 1
    assert per_sample_ops == []
    assert state_ops / steps <= max_state_ops


@pytest.mark.parametrize("solver", ["euler", "dpm_solver_2m", "dpm_solver_3m", "heun"])
@pytest.mark.parametrize("process", [VP(), Flow()], ids=["vp", "flow"])
def test_noise_form_run_to_t0_ends_on_the_x0_prediction(solver, process):
    """A noise-prediction step onto sigma = 0 (lambda = +inf) is taken in its exact limit
    alpha_t (x_s - sigma_s eps_s) / alpha_s: the run must end exactly where ``denoise_final`` at the
    last positive time ends (the x0 prediction there), and be close to the exact ODE solution."""
    mix = make_mixture(dim=2, num_components=3, std=0.5, radius=1.0)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t_start = 1.0 if isinstance(process, VP) else 0.99
    x_T = x_T * process.sigma(torch.tensor(t_start)).item()
    grid = torch.linspace(t_start, 0.02, 30, dtype=torch.float64)
    mf = mix.model_fn(process)
    to_zero = sample(mf, x_T, solver, times=torch.cat([grid, torch.zeros(1, dtype=torch.float64)]))
    final = sample(mf.reset(), x_T, solver, times=grid, denoise_final=True)
    assert (to_zero - final).abs().max().item() < 1e-10
    ref = mix.ode_reference(process, x_T, t_start, 1e-4, rtol=1e-10, atol=1e-10)
    assert (to_zero - ref).abs().max().item() < 0.1  # 30 uniform-t steps; Euler errs most (0.077)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "dpm_solver_3m"])
def test_lower_order_final_boundary_at_15_steps(solver):
    """diffusers' rule: DPM-Solver(++) multistep lowers the last orders only when steps < 15. At 14
    steps the last step is order 1 (and the one before at most 2); at 15 none is lowered, so
    ``lower_order_final`` changes nothing (checked bitwise) and diffusers agrees."""
    orders = {n: [s.order for s in solver_strategies(solver, n)] for n in (14, 15)}
    base = SOLVERS[solver][0].order
    assert orders[15] == [base] * 15
    assert orders[14][-1] == 1 and orders[14][-2] == min(base, 2) and orders[14][:-2] == [base] * 12
    mix = make_mixture()
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mf = mix.model_fn(VP())
    on = sample(mf, x_T, solver, steps=15)
    off = sample(mf, x_T, solver, steps=15, lower_order_final=False)
    assert torch.equal(on, off)
    assert not torch.equal(sample(mf, x_T, solver, steps=14), sample(mf, x_T, solver, steps=14,
                                                                       lower_order_final=False))


def test_lower_order_final_matches_diffusers_at_15_steps():
    diffusers = pytest.importorskip("diffusers")
    from tests.test_samplers_diffusers import BETAS, grid, ours, run_diffusers

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, solver_order=3, algorithm_type="dpmsolver++",
                                                  solver_type="midpoint", lower_order_final=True,
                                                  final_sigmas_type="sigma_min")
    ref = run_diffusers(sched, x_T, 15)
    out, mf = ours(sched, grid(sched, 0.001), x_T, "dpmpp_3m")
    assert mf.nfe == 15 and (out - ref).abs().max().item() <= 1e-5
