"""Comparing editing methods over a grid of settings: shared inversions, a success / preservation
frontier and a selection rule.

An editing *method* turns (scale w, target value a) into the denoiser that regenerates the inverted
sources and its conditioning: :func:`embedding_method` (CFG between a vector per target and the
null row: CASO's embeddings, the mean-difference rows) or :func:`guidance_method` (the unguided
model with classifier guidance). :func:`edit_sweep` inverts each source set once per depth t_edit
(null class, guidance 1, as CASO inverts) and regenerates it with every method and scale on the same
grid, so the methods differ only in the regeneration. ``measure(edited, sources, labels, target)``
returns the row's numbers (success, preservation, ...).

:func:`pareto_front` and :func:`select` implement the frontier and the decision rule of
docs/editing.md (slant experiment).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from difftools.editing.baselines import ClassifierGuidedFn
from difftools.editing.caso import EmbeddingDiT, guided_model_fn
from difftools.editing.inversion import inversion_grid, invert, regenerate
from samplers.model import ModelFn

__all__ = ["edit_sweep", "embedding_method", "guidance_method", "pareto_front", "select"]

Method = Callable[[float, int], tuple[ModelFn, dict]]


def embedding_method(net: EmbeddingDiT, process, prediction: str, vectors: dict[int, torch.Tensor]) -> Method:
    """CFG with cond = ``vectors[a]`` and uncond = the null row, at scale w."""
    null = net.null_embedding()

    def make(w: float, target: int):
        return guided_model_fn(net, process, prediction, w, null), {"y_embed": vectors[target]}

    return make


def guidance_method(model_fn: ModelFn, classifier, unit: float) -> Method:
    """Classifier guidance of the unguided ``model_fn`` toward a, with step s = w * ``unit``."""

    def make(w: float, target: int):
        return ClassifierGuidedFn(model_fn, classifier, target, w * unit), {}

    return make


@torch.no_grad()
def edit_sweep(model_fn: ModelFn, sources: dict[int, tuple[torch.Tensor, torch.Tensor]],
               methods: dict[str, Method], scales, depths, measure, steps: int = 10, solver: str = "ddim",
               schedule: str = "uniform_t", t_end: float = 1e-3, log=print) -> list[dict]:
    """Edit ``sources[a] = (images, labels)`` toward every target a with every method, scale w and
    depth t_edit; one row per (method, w, t_edit, a) with ``measure``'s numbers, n and seconds.

    ``model_fn`` (the unguided DiT, null conditioning) defines the inversion; every source set is
    inverted once per depth on a grid of ``steps`` points of ``schedule`` on [t_end, t_edit]."""
    rows = []
    for t_edit in depths:
        grid = inversion_grid(model_fn, steps, schedule, t_edit, t_end)
        for target, (x, y) in sources.items():
            x_T = invert(model_fn, x, solver=solver, times=grid)
            for name, make in methods.items():
                for w in scales:
                    t0 = time.perf_counter()
                    fn, cond = make(w, target)
                    cond = {k: v.expand(len(x), -1) if v.ndim == 1 else v for k, v in cond.items()}
                    out = regenerate(fn, x_T, solver=solver, times=grid, **cond).clamp(-1, 1)
                    row = {"method": name, "w": float(w), "t_edit": float(t_edit), "target": int(target),
                           "n": len(x), **measure(out, x, y, target),
                           "seconds": round(time.perf_counter() - t0, 2)}
                    rows.append(row)
                    if log is not None:
                        log(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row.items()))
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (preservation, success) that no other point beats in both (>= in both,
    > in one), sorted by preservation."""
    front = []
    for i, (p, s) in enumerate(points):
        dominated = any(q >= p and r >= s and (q > p or r > s) for j, (q, r) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def select(settings: list[dict], min_kept: float, min_ssim: float) -> dict | None:
    """The setting with the highest ``success`` among those with ``kept >= min_kept`` and
    ``ssim >= min_ssim`` (ties: the higher ssim); None when no setting qualifies."""
    ok = [s for s in settings if s["kept"] >= min_kept and s["ssim"] >= min_ssim]
    return max(ok, key=lambda s: (s["success"], s["ssim"])) if ok else None
