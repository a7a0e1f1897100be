"""Entry point ``sample``. (First version: DDIM only; the sampler-library issue generalises it.)"""

from __future__ import annotations

import torch

from samplers.model import ModelFn


def sample(model_fn: ModelFn, x_T: torch.Tensor, solver: str = "ddim", steps: int = 10,
           t_start: float = 1.0, t_end: float = 1e-3, times: torch.Tensor | None = None,
           denoise_final: bool = False, **cond) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021) on a uniform-in-t grid:
    x_t = alpha_t x0_hat + sigma_t eps_hat."""
    if solver != "ddim":
        raise ValueError(f"unknown solver {solver!r}")
    if times is None:
        times = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    x = x_T
    proc = model_fn.process
    for t_s, t_t in zip(times[:-1], times[1:]):
        x0, eps = model_fn.predict(x, t_s, **cond)
        x = proc.alpha(t_t).to(x) * x0 + proc.sigma(t_t).to(x) * eps
    if denoise_final:
        x = model_fn.x0(x, times[-1], **cond)
    return x
