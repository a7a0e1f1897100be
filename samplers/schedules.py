"""Time-step schedules: small named functions returning a float64 grid of ``steps + 1`` times.

Every schedule returns t_0 = t_start > t_1 > ... > t_steps = t_end exactly (strictly decreasing;
time convention t = 1 noise, t = 0 data), computed in float64 so that grids are reproducible
and never rounded to integers (diffusers' integer-timestep rounding caused #4122, #12771).

* ``uniform_t``   t uniform (DDIM's "uniform" skip type, Song et al. 2021, arXiv 2010.02502)
* ``logsnr``      lambda = log(alpha/sigma) uniform (DPM-Solver, Lu et al. 2022, arXiv 2206.00927)
* ``karras``      sigma/alpha = e^{-lambda} uniform in its 1/rho power (EDM, Karras et al. 2022,
                  arXiv 2206.00364): s_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho
* ``quadratic``   t_i = t_end + (t_start - t_end) (1 - i/N)^2 (DDIM's "quadratic" skip type)

Where lambda(t_start) = -inf (Flow at t = 1), lambda-based schedules are laid out from
``lambda_min`` (default -7, sigma/alpha ~ 1100) and the first point is then set to t_start: the
first solver step covers the infinite lambda interval, which the solvers take in its exact limit.
"""

from __future__ import annotations

import math

import torch

from samplers.process import NoiseProcess

LAMBDA_MIN = -7.0


def _finish(times: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
    times = times.to(torch.float64).clone()
    times[0], times[-1] = float(t_start), float(t_end)
    return check_times(times)


def check_times(times: torch.Tensor) -> torch.Tensor:
    """Validate a grid: 1-D, at least 2 points, finite, strictly decreasing; returns float64."""
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if times.numel() < 2:
        raise ValueError("a time grid needs at least 2 points (1 step)")
    if not bool(torch.isfinite(times).all()):
        raise ValueError("time grid contains non-finite values")
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError(
            f"time grid must be strictly decreasing (t=1 noise -> t=0 data), got {times.tolist()}"
        )
    return times


def _check_args(steps: int, t_start: float, t_end: float) -> None:
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not t_start > t_end:
        raise ValueError(f"t_start ({t_start}) must be larger than t_end ({t_end})")


def _lambda_range(process: NoiseProcess, t_start: float, t_end: float, lambda_min: float):
    lam_start = float(process.lambda_(torch.tensor(float(t_start), dtype=torch.float64)))
    lam_end = float(process.lambda_(torch.tensor(float(t_end), dtype=torch.float64)))
    if not math.isfinite(lam_start):
        lam_start = min(lambda_min, lam_end - 1.0)
    return lam_start, lam_end


def uniform_t(process: NoiseProcess, steps: int, t_start: float = 1.0, t_end: float = 1e-3) -> torch.Tensor:
    """t_i = t_start + i/N (t_end - t_start)."""
    _check_args(steps, t_start, t_end)
    return _finish(torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64), t_start, t_end)


def logsnr(
    process: NoiseProcess,
    steps: int,
    t_start: float = 1.0,
    t_end: float = 1e-3,
    lambda_min: float = LAMBDA_MIN,
) -> torch.Tensor:
    """lambda_i uniform between lambda(t_start) and lambda(t_end); t_i = t(lambda_i)."""
    _check_args(steps, t_start, t_end)
    lam_start, lam_end = _lambda_range(process, t_start, t_end, lambda_min)
    lam = torch.linspace(lam_start, lam_end, steps + 1, dtype=torch.float64)
    return _finish(process.t_of_lambda(lam), t_start, t_end)


def karras(
    process: NoiseProcess,
    steps: int,
    t_start: float = 1.0,
    t_end: float = 1e-3,
    rho: float = 7.0,
    lambda_min: float = LAMBDA_MIN,
) -> torch.Tensor:
    """EDM's schedule in s = sigma/alpha: s_i^(1/rho) uniform between s_max^(1/rho) and s_min^(1/rho)."""
    _check_args(steps, t_start, t_end)
    lam_start, lam_end = _lambda_range(process, t_start, t_end, lambda_min)
    s_max, s_min = math.exp(-lam_start), math.exp(-lam_end)
    ramp = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _finish(process.t_of_lambda(-torch.log(s)), t_start, t_end)


def quadratic(process: NoiseProcess, steps: int, t_start: float = 1.0, t_end: float = 1e-3) -> torch.Tensor:
    """t_i = t_end + (t_start - t_end) (1 - i/N)^2: denser near the data end."""
    _check_args(steps, t_start, t_end)
    ramp = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return _finish(t_end + (t_start - t_end) * ramp**2, t_start, t_end)


SCHEDULES = {"uniform_t": uniform_t, "logsnr": logsnr, "karras": karras, "quadratic": quadratic}


def get_times(
    process: NoiseProcess,
    schedule="logsnr",
    steps: int = 10,
    t_start: float = 1.0,
    t_end: float = 1e-3,
    **kwargs,
) -> torch.Tensor:
    """Build a grid by name (``uniform_t``, ``logsnr``, ``karras``, ``quadratic``), from a callable
    ``schedule(process, steps, t_start, t_end)``, or validate a given decreasing tensor."""
    if isinstance(schedule, torch.Tensor):
        return check_times(schedule)
    if callable(schedule):
        return check_times(schedule(process, steps, t_start, t_end, **kwargs))
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {sorted(SCHEDULES)} or a tensor")
    return SCHEDULES[schedule](process, steps, t_start, t_end, **kwargs)
