"""``sample``: every named solver is a configuration of the exponential-integrator core (:mod:`samplers.usf`).

==============  ===========  =====  =========  =========  ==========================================
name            prediction   order  coef       corrector  paper
==============  ===========  =====  =========  =========  ==========================================
ddim            data         1      -          -          Song et al. 2021, arXiv 2010.02502
euler           noise        1      -          -          Karras et al. 2022 (= DDIM, see usf.py)
heun            noise        1      bh2        implicit   Karras et al. 2022, arXiv 2206.00364
dpmpp_2m        data         2      dpm        -          Lu et al. 2022, arXiv 2211.01095
dpmpp_3m        data         3      dpm        -          Lu et al. 2022, arXiv 2211.01095
dpm_solver_2m   noise        2      dpm        -          Lu et al. 2022, arXiv 2206.00927 (multistep)
dpm_solver_3m   noise        3      dpm        -          Lu et al. 2022, arXiv 2206.00927 (multistep)
dpmpp_2s        data         2      dpm        -          singlestep r = 1/2, arXiv 2211.01095
dpm_solver_2    noise        2      dpm        -          singlestep r = 1/2, arXiv 2206.00927
dpm_solver_3    noise        3      taylor     -          singlestep r = 1/3, 2/3, arXiv 2206.00927
unipc_bh1       data         2*     bh1        pseudo     Zhao et al. 2023, arXiv 2302.04867
unipc_bh2       data         2*     bh2        pseudo     Zhao et al. 2023, arXiv 2302.04867
usf             per step     ...    ...        ...        Liu et al. 2023, arXiv 2312.07243 (S³)
==============  ===========  =====  =========  =========  ==========================================

(* ``order=`` chooses 1..3.) ``lower_order_final`` follows each reference implementation:
DPM-Solver(++) multistep uses order 1 for the last step and at most 2 for the one before when
steps < 15 (diffusers' rule); UniPC uses at most ``steps - i`` at step i. Multistep solvers start
with lower orders until enough history exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from samplers.dualfast import DualFast
from samplers.langevin import LMLCorrector
from samplers.model import ModelFn
from samplers.momentum import HeavyBall
from samplers.schedules import get_times
from samplers.usf import StepPlan, Strategy, integrate, plan

#: ``dualfast="auto"`` turns DualFast on for AUTO_STEPS[0] <= steps <= AUTO_STEPS[1]: on the trained DiTs it
#: lowered fd at 5-8 NFE for every solver, raised it at 4 NFE (DiT-S/2) and was within noise, with lower
#: class accuracy, at 10-20 for the high-order solvers (docs/samplers.md).
AUTO_STEPS = (5, 8)

# name -> (Strategy template, lower_order_final rule)
SOLVERS: dict[str, tuple[Strategy, str | None]] = {
    "ddim": (Strategy("data", 1), None),
    "euler": (Strategy("noise", 1), None),
    "heun": (Strategy("noise", 1, "bh2", corrector="implicit"), None),
    "dpmpp_2m": (Strategy("data", 2, "dpm"), "dpm"),
    "dpmpp_3m": (Strategy("data", 3, "dpm"), "dpm"),
    "dpm_solver_2m": (Strategy("noise", 2, "dpm"), "dpm"),
    "dpm_solver_3m": (Strategy("noise", 3, "dpm"), "dpm"),
    "dpmpp_2s": (Strategy("data", 2, "dpm", singlestep=(0.5,)), None),
    "dpm_solver_2": (Strategy("noise", 2, "dpm", singlestep=(0.5,)), None),
    "dpm_solver_3": (Strategy("noise", 3, "taylor", singlestep=(1 / 3, 2 / 3)), None),
    "unipc_bh1": (Strategy("data", 2, "bh1", corrector="pseudo"), "unipc"),
    "unipc_bh2": (Strategy("data", 2, "bh2", corrector="pseudo"), "unipc"),
}


def solver_strategies(
    solver: str,
    steps: int,
    order: int | None = None,
    lower_order_final: bool = True,
    corrector: bool | None = None,
    strategies: Sequence | None = None,
) -> list[Strategy]:
    """The per-step strategies of a named solver (or of ``usf`` from ``strategies``)."""
    if solver == "usf":
        if strategies is None:
            raise ValueError("solver='usf' needs strategies=[...] (one Strategy or dict per step)")
        strategies = [Strategy.from_any(s) for s in strategies]
        if len(strategies) != steps:
            raise ValueError(f"usf: {len(strategies)} strategies for {steps} steps")
        return strategies
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS) + ['usf']}")
    base, rule = SOLVERS[solver]
    if order is not None:
        if base.singlestep is not None or solver in ("ddim", "euler", "heun"):
            raise ValueError(f"solver {solver!r} has a fixed order; order= applies to multistep solvers")
        base = Strategy(base.prediction, int(order), base.coef, base.corrector)
    if corrector is not None and solver.startswith("unipc"):
        base = Strategy(base.prediction, base.order, base.coef, "pseudo" if corrector else None)
    out = []
    for i in range(steps):
        o = base.order
        if lower_order_final and rule == "dpm" and steps < 15:
            o = 1 if i == steps - 1 else (min(o, 2) if i == steps - 2 else o)
        elif lower_order_final and rule == "unipc":
            o = min(o, steps - i)
        out.append(Strategy(base.prediction, o, base.coef, base.corrector, None, base.singlestep))
    return out


def _build_hooks(hooks: Sequence, lml, momentum) -> list:
    hooks = list(hooks)
    # momentum first: HeavyBall reads the solver's own update back from (x_prev, x_next), which a
    # Langevin corrector applied before it would contaminate with its noise.
    if momentum is not None:
        hooks.append(HeavyBall(momentum))
    if lml is not None:
        hooks.append(LMLCorrector(**(lml if isinstance(lml, dict) else {})))
    for h in hooks:
        h.reset()
    return hooks


def build_dualfast(dualfast, num_steps: int, process) -> DualFast | None:
    """The run's :class:`~samplers.dualfast.DualFast` (reset for ``num_steps``, bound to ``process``) from
    :func:`sample`'s ``dualfast`` argument, or None when off."""
    if isinstance(dualfast, str):
        if dualfast != "auto":
            raise ValueError(f"dualfast must be True/False, 'auto', a dict or a DualFast, got {dualfast!r}")
        dualfast = AUTO_STEPS[0] <= num_steps <= AUTO_STEPS[1]
    if dualfast is None or dualfast is False:
        return None
    if dualfast is True:
        df = DualFast()
    elif isinstance(dualfast, dict):
        df = DualFast(**dualfast)
    elif isinstance(dualfast, DualFast):
        df = dualfast
    else:
        raise TypeError("dualfast must be True/False, 'auto', a dict of DualFast options, or a DualFast")
    df.reset(num_steps)
    df.process = process
    return df


def sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    solver: str = "dpmpp_2m",
    steps: int = 10,
    schedule="logsnr",
    t_start: float = 1.0,
    t_end: float = 1e-3,
    times: torch.Tensor | None = None,
    denoise_final: bool = False,
    dualfast=False,
    callback: Callable | None = None,
    hooks: Sequence = (),
    lml: dict | None = None,
    momentum: float | None = None,
    disable_progress: bool = True,
    order: int | None = None,
    lower_order_final: bool = True,
    corrector: bool | None = None,
    strategies: Sequence | None = None,
    return_plan: bool = False,
    **cond,
):
    """Solve the probability-flow ODE from x_T at t_start down to t_end.

    Args:
        model_fn: a :class:`~samplers.model.ModelFn` (or a guidance wrapper of one).
        x_T: the initial state at ``t_start`` (noise scaled by sigma(t_start) for VP/EDM).
        solver: a name from :data:`SOLVERS` or ``usf`` (then ``strategies=`` gives one
            :class:`~samplers.usf.Strategy` or dict per step).
        steps, schedule, t_start, t_end: the grid (see :mod:`samplers.schedules`); ``times`` (a
            decreasing 1-D tensor) overrides them.
        denoise_final: return the x0 prediction at t_end (one more NFE) instead of x(t_end).
        dualfast: True (defaults), a dict of options, a :class:`~samplers.dualfast.DualFast`, or
            ``"auto"``: the defaults when AUTO_STEPS[0] <= steps <= AUTO_STEPS[1] (5-8), else off
            (:data:`AUTO_STEPS`; the measurements behind it are in docs/samplers.md). Default off.
        callback: called as ``callback(dict(i, t, x, x0, t_next, x_next))`` after each step.
        hooks: objects with ``reset()`` and ``__call__(model_fn, x_prev, x_next, t_prev, t_next,
            step_index, cond) -> x_next`` applied after every solver step; ``lml=dict(...)`` adds
            ``samplers.langevin.LMLCorrector(**lml)`` (2 NFE per iteration; ``lamb=math.inf`` is
            first-order Langevin, 1 NFE), ``momentum=beta`` adds
            ``samplers.momentum.HeavyBall(beta)``.
        disable_progress: no tqdm bar (default).
        order, lower_order_final, corrector: solver options (see module docstring).
        return_plan: also return the list of :class:`~samplers.usf.StepPlan` (for inspection).
        **cond: passed to the network (e.g. ``y=labels``).

    The state is float32 (float64 if x_T is float64) whatever the network's output dtype; the
    result is cast back to x_T's dtype.
    """
    process = model_fn.process
    if times is None:
        times = get_times(process, schedule, steps, t_start, t_end)
    else:
        times = get_times(process, torch.as_tensor(times, dtype=torch.float64))
    num_steps = times.numel() - 1
    strats = solver_strategies(solver, num_steps, order, lower_order_final, corrector, strategies)
    plans: list[StepPlan] = plan(process, times, strats)
    state_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    x = x_T.to(state_dtype)
    hook_list = _build_hooks(hooks, lml, momentum)
    df = build_dualfast(dualfast, num_steps, process)
    modifier = df.modify if df is not None else None
    progress = None
    if not disable_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=num_steps, desc=solver)
    try:
        x, _ = integrate(model_fn, x, plans, cond, modifier, hook_list, callback, progress)
    finally:
        if progress is not None:
            progress.close()
    if denoise_final:
        x = model_fn.predict(x, float(times[-1]), **cond).x0
    x = x.to(x_T.dtype)
    return (x, plans) if return_plan else x
