"""Cross-check every configuration against diffusers' schedulers on the same model and time points (float64).

diffusers runs on integer training timesteps k = 0..999; our DiscreteVP puts k at t = (k+1)/1000,
so our grid is t = (timesteps + 1) / 1000 and the ModelFn's time_input maps back (N t - 1).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difftools.process import VP  # noqa: E402
from samplers import ModelFn, sample  # noqa: E402

TOL = 1e-5


_AC = None


def eps_net(x: torch.Tensor, timestep) -> torch.Tensor:
    """The exact noise predictor for data ~ N(0, 0.5^2) (keeps x of order one, so that float32
    rounding inside diffusers stays far below the tolerance) plus a smooth nonlinear term of
    (x, timestep): eps = sigma x / (alpha^2 c^2 + sigma^2) + 0.1 tanh(1.3 x + 0.2 sin(k/97))."""
    k = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    a2 = _AC.to(torch.float64)[k.round().long().clamp(0, 999)]
    sigma = torch.sqrt(1 - a2)
    return sigma * x / (a2 * 0.25 + 1 - a2) + 0.1 * torch.tanh(1.3 * x + 0.2 * torch.sin(k / 97.0))


def run_diffusers(sched, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    global _AC
    _AC = sched.alphas_cumprod
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        x = sched.step(eps_net(inp, t.expand(x.shape[0])), t, x).prev_sample
    return x


def ours(sched, times, x_T, solver, **kw):
    process = VP.from_alphas_cumprod(sched.alphas_cumprod)
    # diffusers' state is x/alpha for Euler/Heun (init_noise_sigma = sigma_max/alpha there) and x
    # otherwise: start from the same point, expressed as x.
    x_T = x_T * float(sched.init_noise_sigma) * process.alpha(times[0]).item() if _scaled(sched) else x_T
    mf = ModelFn(lambda x, k: eps_net(x, k), process, "eps", time_input=process.timestep)
    return sample(mf, x_T, solver=solver, times=times, **kw), mf


def _scaled(sched) -> bool:
    return isinstance(sched, (diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler))


def grid(sched, final: float | None):
    ts = [(float(k) + 1.0) / 1000.0 for k in sched.timesteps]
    return torch.tensor(ts + ([final] if final is not None else []), dtype=torch.float64)


@pytest.fixture
def x_T():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_ddim(x_T):
    sched = diffusers.DDIMScheduler(
        **BETAS, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
    )
    ref = run_diffusers(sched, x_T, 10)
    out, mf = ours(sched, grid(sched, 0.001), x_T, "ddim")
    assert mf.nfe == 10
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("steps", [8, 16])
def test_dpm_solver_multistep(x_T, order, algorithm, steps):
    # steps=8 exercises lower_order_final (< 15 steps), 16 the plain multistep recursion.
    sched = diffusers.DPMSolverMultistepScheduler(
        **BETAS,
        solver_order=order,
        algorithm_type=algorithm,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="sigma_min",
    )
    ref = run_diffusers(sched, x_T, steps)
    name = {"dpmsolver++": f"dpmpp_{order}m", "dpmsolver": f"dpm_solver_{order}m"}[algorithm]
    out, mf = ours(sched, grid(sched, 0.001), x_T, name)
    assert mf.nfe == steps
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc(x_T, variant, order):
    sched = diffusers.UniPCMultistepScheduler(
        **BETAS,
        solver_order=order,
        solver_type=variant,
        lower_order_final=True,
        final_sigmas_type="sigma_min",
    )
    ref = run_diffusers(sched, x_T, 9)
    out, mf = ours(sched, grid(sched, 0.001), x_T, f"unipc_{variant}", order=order)
    assert mf.nfe == 9
    assert (out - ref).abs().max().item() <= TOL


def test_euler(x_T):
    sched = diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing")
    ref = run_diffusers(sched, x_T, 10)
    # diffusers' last step goes to sigma = 0, i.e. returns the x0 prediction: denoise_final.
    out, mf = ours(sched, grid(sched, None), x_T, "euler", denoise_final=True)
    assert mf.nfe == 10
    assert (out - ref).abs().max().item() <= TOL


def test_heun(x_T):
    sched = diffusers.HeunDiscreteScheduler(**BETAS, timestep_spacing="trailing")
    steps = 6
    sched.set_timesteps(steps)
    ref = run_diffusers(sched, x_T, steps)
    out, mf = ours(sched, _heun_grid(sched), x_T, "heun", denoise_final=True)
    assert mf.nfe == 2 * steps - 1
    assert (out - ref).abs().max().item() <= TOL


def _heun_grid(sched):
    # diffusers repeats each interior timestep (first and second order stage); keep each once.
    ks = []
    for k in sched.timesteps.tolist():
        if not ks or ks[-1] != k:
            ks.append(k)
    return torch.tensor([(k + 1.0) / 1000.0 for k in ks], dtype=torch.float64)
