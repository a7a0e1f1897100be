"""Search scores: ``score_fn(samples) -> float``, lower is better.

The paper scores FID of 1,000 samples (``scripts/search_schedule.py --score fd`` plugs a
Fréchet distance in); :func:`reference_score` is the distance-to-teacher proxy: the RMSE to a
high-NFE solution from the same noise.
"""

from __future__ import annotations

import torch

from samplers.sampling import sample


class ReferenceScore:
    """RMSE between samples and a fixed reference solution from the same noise (lower is better)."""

    def __init__(self, reference: torch.Tensor, description: str = "reference"):
        self.reference = reference.detach().to(torch.float64)
        self.description = description

    def __call__(self, x: torch.Tensor) -> float:
        if x.shape != self.reference.shape:
            raise ValueError(
                f"samples {tuple(x.shape)} do not match the reference {tuple(self.reference.shape)}"
            )
        return float(((x.detach().to(torch.float64) - self.reference) ** 2).mean().sqrt())


def reference_score(
    model_fn,
    x_T_calib: torch.Tensor,
    cond: dict | None = None,
    ref_solver: str = "unipc_bh2",
    ref_steps: int = 100,
    t_start: float = 1.0,
    t_end: float = 1e-3,
) -> ReferenceScore:
    """Distance-to-teacher proxy: RMSE to ``ref_solver`` with ``ref_steps`` steps (logSNR grid)
    from the same noise ``x_T_calib`` over the same interval [t_end, t_start]."""
    with torch.no_grad():
        ref = sample(
            model_fn, x_T_calib, ref_solver, steps=ref_steps, t_start=t_start, t_end=t_end, **(cond or {})
        )
    if not bool(torch.isfinite(ref).all()):
        raise ValueError(f"the reference solution ({ref_solver}, {ref_steps} steps) is not finite")
    return ReferenceScore(ref, f"RMSE to {ref_solver} with {ref_steps} steps")
