"""Deterministic ODE inversion: run the probability-flow ODE from data (t_end) up to noise (t_start).

DDIM inversion (Song et al. 2021, arXiv 2010.02502, Sec. 4.3; used for editing by Prompt-to-Prompt /
Null-text inversion, arXiv 2211.09794, and by CASO, arXiv 2505.14254) is the DDIM step taken with
the time grid reversed. With the denoiser (x0, eps) evaluated at the current, less noisy point s,

    x_t = alpha_t x0(x_s, s) + sigma_t eps(x_s, s),        t > s,

which is the order-1 exponential-integrator update x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) x0_s,
h = lambda_t - lambda_s (< 0 here), of :mod:`samplers.usf`. Every multistep solver of
:mod:`samplers.sampling` is the same integrator with Taylor terms from previous evaluations, and its
coefficients hold for a step of either sign, so ``invert`` plans the solver of the user's choice on
the reversed grid with :func:`samplers.usf.plan` and runs it with :func:`samplers.usf.integrate`.
Regeneration is :func:`samplers.sample` on the forward grid: ``invert`` followed by ``regenerate``
with the same conditioning, solver and grid reconstructs the input up to the solvers' discretisation
error (the inversion evaluates the network at x_s where the sampler evaluates it at x_t), which
shrinks as the number of steps grows (order 1 for ddim, order 2 for dpmpp_2m; measured in
tests/test_editing.py and docs/editing.md).

Infinite steps: a flow model at t = 1 has alpha = 0, lambda = -inf. The inversion's last step then
ends exactly at the noise, x_1 = alpha_1 x0_s + sigma_1 eps_s = eps_s: its exact limit (the plan's
own formula assumes an infinite step toward the data and does not apply), taken at order 1.

``edit`` composes the two: invert under one conditioning (the null class by default, CASO's empty
prompt) from the data up to ``t_edit`` (1 = full inversion; smaller values keep more of the source,
the "edit strength" of SDEdit-style editing, arXiv 2108.01073), then denoise from there under another
conditioning, usually through a guidance wrapper.
"""

from __future__ import annotations

import math

import torch

from samplers.model import ModelFn
from samplers.process import scalar_at
from samplers.sampling import sample, solver_strategies
from samplers.schedules import get_times
from samplers.usf import StepPlan, Update, integrate, plan

__all__ = ["edit", "inversion_grid", "invert", "regenerate"]


def inversion_grid(model_fn: ModelFn, steps: int = 50, schedule="uniform_t", t_start: float = 1.0,
                   t_end: float = 1e-3, times=None) -> torch.Tensor:
    """The forward (decreasing, noise -> data) grid that ``invert`` walks backwards and ``regenerate``
    walks forwards: :func:`samplers.schedules.get_times` of the same arguments."""
    if times is not None:
        return get_times(model_fn.process, torch.as_tensor(times, dtype=torch.float64))
    return get_times(model_fn.process, schedule, steps, t_start, t_end)


def _exact_noise_end(p: StepPlan, process) -> StepPlan:
    """Replace an infinite step's predictor by its exact order-1 limit alpha_t x0_s + sigma_t eps_s."""
    a_t, s_t = scalar_at(process.alpha, p.t_t), scalar_at(process.sigma, p.t_t)
    update = Update(cx=0.0, cp=s_t, primary="eps", terms=[(("hist", 0), "x0", a_t)], t_out=p.t_t)
    return StepPlan(p.index, p.t_s, p.t_t, p.strategy, [], update, None, None, 1)


def _lambda(process, t: float) -> float:
    a, s = scalar_at(process.alpha, t), scalar_at(process.sigma, t)
    if a <= 0:
        return -math.inf
    if s <= 0:
        return math.inf
    return scalar_at(process.lambda_, t)


@torch.no_grad()
def invert(model_fn: ModelFn, x0: torch.Tensor, solver: str = "ddim", steps: int = 50,
           schedule="uniform_t", t_start: float = 1.0, t_end: float = 1e-3, times=None,
           order: int | None = None, lower_order_final: bool = True, callback=None, **cond) -> torch.Tensor:
    """Integrate the probability-flow ODE from the data end up to ``t_start``: returns x(t_start).

    Args:
        model_fn: the (unguided, usually) :class:`~samplers.model.ModelFn` that defines the ODE.
        x0: the clean image / latent, taken as the state at ``t_end`` (the sampler's last grid time).
        solver: a multistep or singlestep name of :data:`samplers.sampling.SOLVERS` (``usf`` is not
            offered: its per-step strategies are defined for the sampling direction). Prefer ddim,
            dpmpp_2m/3m or heun: UniPC's corrector is unstable run backwards at few steps (4-D
            mixture, VP, t 1e-3 -> 0.9, max error at 10/20/40 steps: unipc_bh2 23 / 4.4 / 0.71
            against dpmpp_2m 1.0 / 0.41 / 0.15).
        steps, schedule, t_start, t_end, times: the grid, exactly as for :func:`samplers.sample`
            (``times`` a decreasing tensor); the same arguments to ``regenerate`` walk it back.
        order, lower_order_final: as for :func:`samplers.sample`; the "final" steps of the
            mirrored rule are then the ones nearest the noise.
        callback: called as in :func:`samplers.sample` after each step.
        **cond: network conditioning (e.g. ``y=labels`` or ``y_embed=...``).

    The state is float32 (float64 for a float64 input) and cast back to x0's dtype.
    """
    if solver == "usf":
        raise ValueError("invert: pass a named solver (ddim, dpmpp_2m, ...), not 'usf'")
    process = model_fn.process
    forward = inversion_grid(model_fn, steps, schedule, t_start, t_end, times)
    backward = forward.flip(0)  # increasing: data -> noise
    num_steps = backward.numel() - 1
    strategies = solver_strategies(solver, num_steps, order, lower_order_final)
    plans = plan(process, backward, strategies)
    for i, p in enumerate(plans):
        if not math.isfinite(_lambda(process, p.t_t) - _lambda(process, p.t_s)):
            plans[i] = _exact_noise_end(p, process)
    state_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x, _ = integrate(model_fn, x0.to(state_dtype), plans, cond, callback=callback)
    return x.to(x0.dtype)


@torch.no_grad()
def regenerate(model_fn: ModelFn, x_T: torch.Tensor, solver: str = "ddim", steps: int = 50,
               schedule="uniform_t", t_start: float = 1.0, t_end: float = 1e-3, times=None,
               order: int | None = None, lower_order_final: bool = True, **cond) -> torch.Tensor:
    """Denoise from x(t_start) to x(t_end) on the grid ``invert`` used: :func:`samplers.sample`."""
    grid = inversion_grid(model_fn, steps, schedule, t_start, t_end, times)
    return sample(model_fn, x_T, solver=solver, times=grid, order=order,
                  lower_order_final=lower_order_final, **cond)


def edit(invert_fn: ModelFn, edit_fn: ModelFn, x0: torch.Tensor, *, invert_cond: dict, edit_cond: dict,
         solver: str = "ddim", steps: int = 50, schedule="uniform_t", t_edit: float = 1.0,
         t_end: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``x0`` under ``invert_cond`` up to ``t_edit``, then denoise under ``edit_cond``.

    ``invert_fn`` is the plain ModelFn (CASO inverts with the empty prompt, i.e. the null class, at
    guidance scale 1); ``edit_fn`` is usually a guidance wrapper of it (CFG with the learned
    embedding as the conditional half). ``t_edit`` in (t_end, 1]: 1 = full inversion; smaller keeps
    more of the source. The grid is ``steps`` points of ``schedule`` on [t_end, t_edit].
    Returns (edited x at t_end, the inverted state at t_edit).
    """
    if not t_end < t_edit <= 1.0:
        raise ValueError(f"t_edit must lie in (t_end={t_end}, 1], got {t_edit}")
    grid = inversion_grid(invert_fn, steps, schedule, t_edit, t_end)
    x_T = invert(invert_fn, x0, solver=solver, times=grid, **invert_cond)
    with torch.no_grad():
        out = regenerate(edit_fn, x_T, solver=solver, times=grid, **edit_cond)
    return out, x_T
