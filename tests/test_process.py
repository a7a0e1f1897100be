"""Identities of the noise processes in samplers/process.py (= difftools.process), all in float64."""

from __future__ import annotations

import math

import pytest
import torch

from difftools.process import (
    EDM,
    PREDICTIONS,
    VP,
    DiscreteVP,
    Flow,
    make_process,
    process_from_config,
)


def _discrete_linear() -> DiscreteVP:
    # Stable Diffusion's "scaled_linear" betas, 1000 steps, as diffusers builds them.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return VP.from_betas(betas)


PROCESSES = {
    "vp_linear": VP("linear"),
    "vp_cosine": VP("cosine"),
    "discrete": _discrete_linear(),
    "flow": Flow(),
    "edm": EDM(),
}
T_GRID = torch.linspace(2e-3, 0.998, 501, dtype=torch.float64)


@pytest.mark.parametrize("name", PROCESSES)
def test_t_of_lambda_is_exact_inverse(name):
    proc = PROCESSES[name]
    lam = proc.lambda_(T_GRID)
    assert torch.isfinite(lam).all()
    assert (lam[1:] < lam[:-1]).all(), "lambda must decrease strictly in t"
    err = (proc.t_of_lambda(lam) - T_GRID).abs().max().item()
    assert err < 1e-6, f"{name}: max |t(lambda(t)) - t| = {err:.2e}"
    # and the other direction, on a lambda grid inside the process' range
    lam_grid = torch.linspace(lam[-1].item(), lam[0].item(), 301, dtype=torch.float64)
    err_l = (proc.lambda_(proc.t_of_lambda(lam_grid)) - lam_grid).abs().max().item()
    assert err_l < 1e-6, f"{name}: max |lambda(t(l)) - l| = {err_l:.2e}"


@pytest.mark.parametrize("name", PROCESSES)
def test_lambda_matches_log_alpha_over_sigma(name):
    proc = PROCESSES[name]
    direct = torch.log(proc.alpha(T_GRID) / proc.sigma(T_GRID))
    torch.testing.assert_close(proc.lambda_(T_GRID), direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", PROCESSES)
def test_derivatives_match_finite_differences(name):
    proc = PROCESSES[name]
    # avoid the breakpoints of the discrete schedule (t = k / 1000), where the derivative jumps
    t = torch.linspace(0.05, 0.95, 37, dtype=torch.float64) + 3.3e-4
    h = 1e-6
    fd_alpha = (proc.alpha(t + h) - proc.alpha(t - h)) / (2 * h)
    fd_sigma = (proc.sigma(t + h) - proc.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(proc.d_alpha(t), fd_alpha, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(proc.d_sigma(t), fd_sigma, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "discrete"])
def test_vp_is_variance_preserving(name):
    proc = PROCESSES[name]
    total = proc.alpha(T_GRID) ** 2 + proc.sigma(T_GRID) ** 2
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_schedule_values():
    # linear VP: log alpha(1) = -(20 - 0.1)/4 - 0.1/2
    assert PROCESSES["vp_linear"].log_alpha(1.0).item() == pytest.approx(-4.975 - 0.05, abs=1e-12)
    assert PROCESSES["vp_cosine"].alpha(0.0).item() == pytest.approx(1.0, abs=1e-12)
    assert PROCESSES["flow"].alpha(0.25).item() == 0.75 and PROCESSES["flow"].sigma(0.25).item() == 0.25
    assert PROCESSES["edm"].sigma(1.0).item() == 80.0
    assert PROCESSES["flow"].t_of_lambda(-math.inf).item() == 1.0


def test_discrete_vp_hits_training_schedule():
    proc = PROCESSES["discrete"]
    i = torch.tensor([0, 10, 499, 999])
    t = proc.t_of_timestep(i.double())
    torch.testing.assert_close(proc.alpha(t) ** 2, proc.alphas_cumprod[i], rtol=1e-12, atol=0)
    torch.testing.assert_close(proc.timestep(t), i.double())


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_round_trip(name, prediction):
    proc = PROCESSES[name]
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    x_t = proc.marginal(x0, eps, t)
    pred = proc.target(x0, eps, t, prediction)
    back = proc.to_x0_eps(pred, x_t, t, prediction)
    torch.testing.assert_close(back.x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back.eps, eps, rtol=1e-9, atol=1e-9)
    for other in PREDICTIONS:
        conv = proc.convert(pred, x_t, t, prediction, other)
        torch.testing.assert_close(conv, proc.target(x0, eps, t, other), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_scalar_time_conversion_equals_per_sample(name, prediction):
    """A Python-number t (the samplers' host-coefficient path) gives the per-sample tensor result."""
    proc = PROCESSES[name]
    g = torch.Generator().manual_seed(2)
    pred, x_t = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64)
    for t in (0.05, 0.5, 0.93):
        scalar = proc.to_x0_eps(pred, x_t, t, prediction)
        tensor = proc.to_x0_eps(pred, x_t, torch.full((6,), t, dtype=torch.float64), prediction)
        torch.testing.assert_close(scalar.x0, tensor.x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scalar.eps, tensor.eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", PROCESSES)
def test_flow_target_is_dx_dt_and_velocity_agrees(name):
    proc = PROCESSES[name]
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                                                                                 dtype=torch.float64)
    # off the discrete schedule's breakpoints k / 1000, where the derivative jumps
    t, h = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64) + 3.3e-4, 1e-6
    fd = (proc.marginal(x0, eps, t + h) - proc.marginal(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(proc.target(x0, eps, t, "flow"), fd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(proc.velocity(proc.marginal(x0, eps, t), x0, t), fd, rtol=1e-6, atol=1e-6)


def test_flow_velocity_is_eps_minus_x0():
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(Flow().target(x0, eps, 0.3, "flow"), eps - x0)


@pytest.mark.parametrize("name", PROCESSES)
def test_sample_t_ranges_and_distributions(name):
    proc = PROCESSES[name]
    g = torch.Generator().manual_seed(0)
    n = 20000
    u = proc.sample_t(n, "uniform", generator=g, t_min=0.1, t_max=0.6)
    assert u.dtype == torch.float32 and u.shape == (n,)
    assert u.min() >= 0.1 and u.max() <= 0.6
    assert u.mean().item() == pytest.approx(0.35, abs=0.01)
    ln = proc.sample_t(n, "logit_normal", generator=g)
    assert ln.min() >= 1e-5 and ln.max() <= 1.0
    assert torch.logit(ln.double()).mean().item() == pytest.approx(0.0, abs=0.03)
    assert torch.logit(ln.double()).std().item() == pytest.approx(1.0, abs=0.03)
    e = proc.sample_t(n, "edm_lognormal", generator=g).double()
    log_ratio = torch.log(proc.sigma(e) / proc.alpha(e))
    # clamping to [1e-5, 1] touches only the far tails; the median of ln(sigma/alpha) is -1.2
    assert log_ratio.median().item() == pytest.approx(-1.2, abs=0.05)
    with pytest.raises(ValueError, match="unknown t distribution"):
        proc.sample_t(4, "beta")


@pytest.mark.parametrize("name", PROCESSES)
def test_config_round_trip(name):
    proc = PROCESSES[name]
    rebuilt = process_from_config(proc.config())
    assert type(rebuilt) is type(proc)
    torch.testing.assert_close(rebuilt.alpha(T_GRID), proc.alpha(T_GRID))
    torch.testing.assert_close(rebuilt.sigma(T_GRID), proc.sigma(T_GRID))


def test_make_process_names_and_errors():
    assert isinstance(make_process("flow"), Flow)
    assert make_process("vp_cosine").schedule == "cosine"
    assert isinstance(make_process("edm", sigma_max=10.0), EDM)
    with pytest.raises(ValueError, match="unknown process"):
        make_process("ddpm++")
    with pytest.raises(ValueError, match="unknown process kind"):
        process_from_config({"kind": "Nope"})
