"""The USF step (samplers.usf) against references derived independently of it (float64).

* A model whose prediction is a known function of lambda only turns the probability-flow ODE into a
  linear one whose exact step is the variation-of-constants integral; it is evaluated here by
  scipy quadrature of the monomials (l - lambda_s)^k, not by the phi-functions the solver uses.
* Along the exact flow of Gaussian data (closed form: x_t = alpha mu + sqrt(alpha^2 s^2 + sigma^2) z)
  the local error of one step with exact history must scale as h^(p+1) for Taylor order p.
* The analytical first step against the closed-form DDIM step with a constant x0, and on Flow at
  t = 1, where E[x0 | x_1] is the data mean, against the exact first step.
* Named solvers as schedules against k-diffusion-style formulas written out here (EDM sigma space)
  and against diffusers' UniPC scheduler.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from difftools.process import EDM, VP, Flow
from samplers import ModelFn, sample
from samplers.sampling import solver_strategies
from samplers.schedule import SolverSchedule
from samplers.usf import Strategy, plan
from tests.mixture import make_mixture

VP_TIMES = torch.tensor([0.9, 0.75, 0.6, 0.45, 0.3, 0.2], dtype=torch.float64)


def lam(process, t) -> float:
    return float(process.lambda_(torch.tensor(float(t), dtype=torch.float64)))


def last_step(model_fn, times, strategies, x_T):
    """(x at the start of the last step, x after it) of a run on ``times``."""
    seen = {}

    def keep(info):
        seen.update(info)

    sample(model_fn, x_T, "usf", times=times, strategies=strategies, callback=keep)
    return seen["x"], seen["x_next"]


def polynomial_model(process, coeffs: torch.Tensor, lam_s: float, prediction: str) -> ModelFn:
    """A ModelFn predicting m(lambda) = sum_k coeffs[k] (lambda - lam_s)^k (x0 or eps), whatever x."""

    def net(x, t):
        lt = process.lambda_(t.to(torch.float64)).reshape(-1, 1)
        powers = torch.cat([(lt - lam_s) ** k for k in range(len(coeffs))], dim=1)  # [B, K]
        return (powers @ coeffs).to(x.dtype)

    return ModelFn(net, process, prediction)


def moment(k: int, lam_s: float, lam_t: float, form: str) -> float:
    """int_{lam_s}^{lam_t} w(l) (l - lam_s)^k dl with w = e^{l - lam_t} (data) or e^{lam_t - l} (noise)."""
    sign = 1.0 if form == "data" else -1.0
    return quad(
        lambda v: math.exp(sign * (v - lam_t)) * (v - lam_s) ** k, lam_s, lam_t, epsabs=0, epsrel=1e-13
    )[0]


def exact_step(process, x_s, t_s, t_t, coeffs, form):
    """The exact linear-ODE step with m a polynomial in (lambda - lambda_s) (quadrature of monomials)."""
    ls, lt = lam(process, t_s), lam(process, t_t)
    a = lambda t: float(process.alpha(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    s = lambda t: float(process.sigma(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    integral = sum(coeffs[k] * moment(k, ls, lt, form) for k in range(len(coeffs)))
    if form == "data":
        return s(t_t) / s(t_s) * x_s + a(t_t) * integral
    return a(t_t) / a(t_s) * x_s - s(t_t) * integral


@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize(
    ("order", "nodes", "degree"),
    [(2, None, 1), (3, None, 2), (4, None, 3), (2, (1, 2), 2), (3, (1, 2, 3), 3), (4, (1, 2, 3, 4), 3)],
)
def test_step_exact_for_polynomials_up_to_its_order(form, order, nodes, degree):
    """Taylor order p reproduces m of degree p - 1 exactly; with q > p - 1 nodes the derivative
    estimates are exact for degree q and only the omitted Taylor terms remain: the error is then
    exactly alpha_t sum_{k >= p} c_k int e^{l - l_t} (l - l_s)^k dl (noise form: -sigma_t ...)."""
    process = VP()
    t_s, t_t = float(VP_TIMES[-2]), float(VP_TIMES[-1])
    g = torch.Generator().manual_seed(degree)
    coeffs = torch.randn(degree + 1, 3, generator=g, dtype=torch.float64)
    mf = polynomial_model(process, coeffs, lam(process, t_s), "x0" if form == "data" else "eps")
    x_T = torch.randn(2, 3, generator=g, dtype=torch.float64)
    strategies = [Strategy(form, min(order, i + 1)) for i in range(len(VP_TIMES) - 2)]
    strategies.append(Strategy(form, order, nodes=nodes))
    x_s, x_t = last_step(mf, VP_TIMES, strategies, x_T)
    expected = exact_step(process, x_s, t_s, t_t, coeffs, form)
    # what the step cannot represent: the Taylor terms of degree >= order (zero when degree < order)
    omitted = torch.zeros_like(coeffs)
    omitted[order:] = coeffs[order:]
    missing = exact_step(process, torch.zeros_like(x_s), t_s, t_t, omitted, form)
    assert (x_t - (expected - missing)).abs().max().item() < 1e-10
    if degree >= order:  # the omitted term is not negligible: the check above would see it
        assert missing.abs().max().item() > 1e-4


@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize("relax", [0.7, -0.4])
def test_relaxation_scales_the_first_derivative_term_by_one_plus_c_h(form, relax):
    """m linear in lambda: the order-2 step is exact without relaxation; with c it adds exactly
    c h times the first-derivative term, c h alpha_t b int e^{l - l_t} (l - l_s) dl (data form) or
    -c h sigma_t b int e^{l_t - l} (l - l_s) dl (noise form), h = lambda_t - lambda_s > 0 in both
    (the official code's ``linear`` relaxation)."""
    process = VP()
    t_s, t_t = float(VP_TIMES[-2]), float(VP_TIMES[-1])
    coeffs = torch.tensor([[0.3, -1.2], [0.8, 0.5]], dtype=torch.float64)  # a + b (l - l_s)
    mf = polynomial_model(process, coeffs, lam(process, t_s), "x0" if form == "data" else "eps")
    x_T = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    strategies = [Strategy(form, min(2, i + 1)) for i in range(len(VP_TIMES) - 2)]
    x_s, plain = last_step(mf, VP_TIMES, strategies + [Strategy(form, 2)], x_T)
    _, relaxed = last_step(mf, VP_TIMES, strategies + [Strategy(form, 2, relax=relax)], x_T)
    h = lam(process, t_t) - lam(process, t_s)
    first = exact_step(
        process, torch.zeros_like(x_s), t_s, t_t, torch.stack([0 * coeffs[1], coeffs[1]]), form
    )
    assert (plain - exact_step(process, x_s, t_s, t_t, coeffs, form)).abs().max().item() < 1e-12
    assert (relaxed - plain - relax * h * first).abs().max().item() < 1e-12
    assert (relax * h * first).abs().max().item() > 1e-3


def gaussian_flow(process, mu, s, z):
    """The exact probability-flow trajectory of data N(mu, s^2 I) through noise z, and its x0 and eps
    predictions as functions of t only (the denoiser evaluated on the trajectory)."""

    def coeffs(t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return process.alpha(t), process.sigma(t)

    def x(t):
        a, sg = coeffs(t)
        return a * mu + torch.sqrt(a**2 * s**2 + sg**2) * z

    def x0(t):
        a, sg = coeffs(t)
        return mu + a * s**2 * (x(t) - a * mu) / (a**2 * s**2 + sg**2)

    def eps(t):
        a, sg = coeffs(t)
        return (x(t) - a * x0(t)) / sg

    return x, x0, eps


GAUSS_MU = torch.tensor([0.6, -1.1, 0.2], dtype=torch.float64)
GAUSS_S = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)  # anisotropic: no shared error constant
GAUSS_Z = torch.tensor([[1.3, -0.4, 0.8]], dtype=torch.float64)


def local_error_slope(form: str, order: int, q: int, coef: str = "taylor", lam_s: float = 0.0) -> float:
    """log2 of the ratio of one-step errors at h = 0.02 and h = 0.01 (exact history, uniform in lambda)."""
    process = VP()
    x, x0, eps = gaussian_flow(process, GAUSS_MU, GAUSS_S, GAUSS_Z)
    pred = x0 if form == "data" else eps
    mf = ModelFn(lambda xt, t: pred(t).expand_as(xt).to(xt.dtype), process, "x0" if form == "data" else "eps")
    errors = []
    for h in (0.02, 0.01):
        times = process.t_of_lambda(
            torch.tensor([lam_s + (j - q) * h for j in range(q + 2)], dtype=torch.float64)
        )
        nodes = tuple(range(1, q + 1)) if q else None
        x_s, x_t = last_step(
            mf, times, [Strategy(form, 1)] * q + [Strategy(form, order, coef, nodes=nodes)], x(times[0])
        )
        a_s, s_s = process.alpha(times[-2]), process.sigma(times[-2])
        a_t, s_t = process.alpha(times[-1]), process.sigma(times[-1])
        scale = s_t / s_s if form == "data" else a_t / a_s
        # the prediction depends on t only, so the ODE is linear and a step's error in its integral
        # term is the same from any start state: compare increments with the exact flow's
        errors.append((x_t - scale * x_s - (x(times[-1]) - scale * x(times[-2]))).abs().max().item())
    return math.log2(errors[0] / errors[1])


@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize(("order", "extra_nodes"), [(1, 0), (2, 0), (3, 0), (4, 0), (2, 1), (3, 1)])
def test_local_error_order_on_the_exact_gaussian_flow(form, order, extra_nodes):
    """One step with exact history on the exact flow of Gaussian data N(mu, diag(s^2)): the local error
    scales as h^(p+1) for Taylor order p, whatever the number of extra estimate nodes (measured
    slopes 1.99-5.03 for p + 1 = 2..5 at lambda_s = 0; tolerance 0.25)."""
    slope = local_error_slope(form, order, order - 1 + extra_nodes)
    assert abs(slope - (order + 1)) < 0.25, slope


@pytest.mark.parametrize("form", ["data", "noise"])
def test_local_error_catches_halved_second_derivative_coefficient(form):
    """The published DPM-Solver(++)-3M coefficient (``dpm``: g_2 = h phi_3, half the exact one) is
    not third order: the same measurement gives a slope near 3 (measured 2.94 / 3.07), not 4."""
    assert abs(local_error_slope(form, 3, 2, "dpm") - 3) < 0.25


@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 3])
def test_final_step_to_data_end_returns_the_x0_prediction(form, order):
    """A last step to t = 0 (VP: sigma = 0, lambda = +inf) is taken in its exact limit
    alpha_0 x0_s + sigma_0 eps_s = x0_s in both forms: the output is the model's x0 prediction at the
    last state (kills a sign flip of the noise form's infinite step, issue 13)."""
    mix = make_mixture(dim=3, num_components=3)
    process = VP()
    times = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    x_T = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen = {}
    out = sample(
        mix.model_fn(process),
        x_T,
        "usf",
        times=times,
        strategies=[Strategy(form, order)] * 4,
        callback=seen.update,
    )
    assert seen["i"] == 3 and (out - seen["x0"]).abs().max().item() < 1e-12
    assert (out - seen["x"]).abs().max().item() > 1e-3  # the last state itself is still noisy


# ---------------------------------------------------------------------------------- analytical first step
@pytest.mark.parametrize("form", ["data", "noise"])
def test_analytical_first_step_is_the_ddim_step_with_constant_x0(form):
    """VP, one step s -> t with x0_hat = c:
    x_t = (sigma_t/sigma_s) x_s + (alpha_t - sigma_t alpha_s/sigma_s) c in both forms (by hand from
    x_t = alpha_t x0 + sigma_t eps with eps = (x_s - alpha_s c)/sigma_s), per channel for a
    [B, C, H, W] state, with no model evaluation."""
    process = VP()
    t_s, t_t = 0.8, 0.5
    c = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64)
    x_s = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mf = ModelFn(lambda x, t: torch.full_like(x, math.nan), process, "x0")  # must never be called
    sched = SolverSchedule(
        torch.tensor([t_s, t_t], dtype=torch.float64), [Strategy(form, 1, afs=tuple(c.tolist()))], process
    )
    out = sched.sample(mf, x_s)
    a = lambda t: float(process.alpha(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    sg = lambda t: float(process.sigma(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    expected = sg(t_t) / sg(t_s) * x_s + (a(t_t) - sg(t_t) * a(t_s) / sg(t_s)) * c.reshape(1, 3, 1, 1)
    assert (out - expected).abs().max().item() < 1e-12
    assert mf.nfe == 0 and sched.nfe == 0


def test_analytical_first_step_is_exact_on_flow_from_noise():
    """Flow at t = 1: x_1 is independent of x0, so E[x0 | x_1] is the data mean sum_k w_k mu_k and the
    analytical first step with that mean is the exact first step: the first state is t_1 x_1 + (1 - t_1)
    mean, and the whole run equals the model-evaluated one with one NFE less."""
    mix = make_mixture(dim=3, num_components=4)
    process = Flow()
    mean = (mix.weights[:, None] * mix.means).sum(0)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    times = torch.tensor([1.0, 0.7, 0.35, 0.1, 1e-3], dtype=torch.float64)
    plain = [Strategy("data", 1), Strategy("data", 2), Strategy("noise", 2, "bh2"), Strategy("data", 3)]
    afs = [Strategy("data", 1, afs=tuple(mean.tolist()))] + plain[1:]
    one = SolverSchedule(times[:2], afs[:1], process)
    assert (one.sample(mix.model_fn(process), x_T) - (0.7 * x_T + 0.3 * mean)).abs().max().item() < 1e-12
    mf_plain, mf_afs = mix.model_fn(process), mix.model_fn(process)
    out_plain = SolverSchedule(times, plain, process).sample(mf_plain, x_T)
    out_afs = SolverSchedule(times, afs, process).sample(mf_afs, x_T)
    assert (out_afs - out_plain).abs().max().item() < 1e-12
    assert mf_plain.nfe == 4 and mf_afs.nfe == 3 == SolverSchedule(times, afs, process).nfe


def test_analytical_first_step_errors_name_the_problem():
    process = VP()
    times = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    with pytest.raises(ValueError, match="step 1: the analytical first step"):
        plan(process, times, [Strategy("data", 1), Strategy("data", 1, afs=(0.0,))])
    sched = SolverSchedule(times, [Strategy("data", 1, afs=(0.1, 0.2))] + [Strategy("data", 1)], process)
    with pytest.raises(ValueError, match="afs has 2 values; a state of shape \\(4, 3\\) needs 1, 3"):
        sched.sample(make_mixture(dim=3).model_fn(process), torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="order 3 needs at least 2 nodes"):
        Strategy("data", 3, nodes=(1,))
    with pytest.raises(ValueError, match="strictly increasing"):
        Strategy("data", 2, nodes=(2, 1))


# ---------------------------------------------------------------------------------- named solvers
def kdiff_dpmpp_2m(denoise, x, sigmas):
    """DPM-Solver++(2M) in sigma space, written as k-diffusion states it (t = -log sigma)."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        h = math.log(s) - math.log(s_next)
        if old is None:
            d_used = d
        else:
            r = h_last / h
            d_used = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        x = (s_next / s) * x - math.expm1(-h) * d_used
        old, h_last = d, h
    return x


def kdiff_dpmpp_3m(denoise, x, sigmas):
    """DPM-Solver++(3M) (k-diffusion's 3M SDE at eta = 0): divided differences of the last three
    denoisings, phi_2 = expm1(-h)/h + 1, phi_3 = phi_2/h - 1/2."""
    d1_hist, hs = [], []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        h = math.log(s) - math.log(s_next)
        x = (s_next / s) * x - math.expm1(-h) * d
        phi2 = math.expm1(-h) / h + 1
        if len(hs) >= 2:
            r0, r1 = hs[-1] / h, hs[-2] / h
            a0 = (d - d1_hist[-1]) / r0
            a1 = (d1_hist[-1] - d1_hist[-2]) / r1
            first = a0 + (a0 - a1) * r0 / (r0 + r1)
            second = (a0 - a1) / (r0 + r1)
            x = x + phi2 * first - (phi2 / h - 0.5) * second
        elif hs:
            x = x + phi2 * (d - d1_hist[-1]) / (hs[-1] / h)
        d1_hist.append(d)
        hs.append(h)
    return x


def kdiff_heun(denoise, x, sigmas):
    """EDM's deterministic Heun (Karras et al. 2022, Algorithm 1, no churn): dx/dsigma = (x - D)/sigma."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        slope = (x - denoise(x, s)) / s
        x_euler = x + (s_next - s) * slope
        slope_next = (x_euler - denoise(x_euler, s_next)) / s_next
        x = x + (s_next - s) * (slope + slope_next) / 2
    return x


def kdiff_euler(denoise, x, sigmas):
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x = x + (s_next - s) * (x - denoise(x, s)) / s
    return x


@pytest.mark.parametrize(
    ("reference", "strategies", "nfe_per_step"),
    [
        (kdiff_dpmpp_2m, [Strategy("data", 2, "dpm")], 1),
        # k-diffusion's 3M warms up with the exact second-order step (phi_2), not the midpoint rule
        (kdiff_dpmpp_3m, [Strategy("data", 1), Strategy("data", 2), Strategy("data", 3, "dpm")], 1),
        (kdiff_heun, [Strategy("noise", 1, "bh2", "implicit")], 2),
        (kdiff_euler, [Strategy("data", 1)], 1),
    ],
    ids=["dpmpp_2m", "dpmpp_3m", "heun", "euler"],
)
def test_schedules_reproduce_kdiffusion_formulas(reference, strategies, nfe_per_step):
    """EDM process (alpha = 1): the schedule with the solver's strategies on a Karras grid equals the
    sigma-space formula written out above, with the same number of model calls."""
    mix = make_mixture(dim=3, num_components=3, std=0.4)
    process = EDM()
    rho, n = 7.0, 7  # Karras et al. 2022: sigma_i^(1/rho) uniform from sigma_max to sigma_min
    sigmas = [
        (80.0 ** (1 / rho) + i / n * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho for i in range(n + 1)
    ]

    def denoise(x, s):
        return mix.posterior_mean(
            x, torch.tensor(1.0, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
        )

    x_T = 80.0 * torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    times = process.t_of_sigma(torch.tensor(sigmas, dtype=torch.float64))
    steps = len(sigmas) - 1
    sched = SolverSchedule(times, (strategies + [strategies[-1]] * steps)[:steps], process)
    mf = mix.model_fn(process)
    ours = sched.sample(mf, x_T)
    ref = reference(denoise, x_T.clone(), sigmas)
    assert (ours - ref).abs().max().item() < 1e-9
    assert mf.nfe == sched.nfe == nfe_per_step * (len(sigmas) - 1)


@pytest.mark.parametrize("steps", [5, 8])
def test_unipc_schedule_reproduces_diffusers(steps):
    """The UniPC-bh2 schedule the search starts from (its strategies on diffusers' own grid) equals
    diffusers' UniPCMultistepScheduler (order 2, bh2, lower_order_final)."""
    diffusers = pytest.importorskip("diffusers")
    from tests.test_samplers_diffusers import BETAS, TOL, eps_net, grid, run_diffusers

    sched = diffusers.UniPCMultistepScheduler(
        **BETAS, solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="sigma_min"
    )
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = run_diffusers(sched, x_T, steps)
    process = VP.from_alphas_cumprod(sched.alphas_cumprod)
    times = grid(sched, 0.001)
    ours = SolverSchedule(times, solver_strategies("unipc_bh2", steps), process)
    mf = ModelFn(lambda x, k: eps_net(x, k), process, "eps", time_input=process.timestep)
    out = ours.sample(mf, x_T)
    assert (out - ref).abs().max().item() <= TOL
    assert mf.nfe == ours.nfe == steps
