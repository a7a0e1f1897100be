"""Sampling a class-conditional flow policy from per-image seeded noise (collection and evaluation).

Image i of a set drawn with seed s starts from noise seeded by the pair (s, i)
(:func:`difftools.metrics.generate.image_noise`), so a set does not depend on the batch size or
the device count, and disjoint seeds give disjoint (held-out) noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from difftools.metrics.generate import image_noise
from samplers import ModelFn, sample
from samplers.guidance import guided


def sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the model's input (latents for a latent model)."""
    return (int(model.in_channels), int(model.input_size), int(model.input_size))


@torch.no_grad()
def sample_policy(
    model: nn.Module,
    process,
    prediction: str,
    labels: torch.Tensor | None,
    seed: int,
    indices: Sequence[int],
    sampler: Mapping,
    *,
    autoencoder=None,
    cfg_scale: float = 1.0,
    batch: int = 256,
    device=None,
    autocast=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 [n, ...] float32 on ``device``, images in [-1, 1] [n, C, H, W]) for noise indices ``indices``.

    Args:
        labels: [n] class labels (None for an unconditional model).
        sampler: ``solver``, ``steps``, ``schedule``, ``t_end`` and ``opts`` (further
            :func:`samplers.sample` keywords); the solver runs from t = 1 with the final denoising step.
        cfg_scale: classifier-free guidance against the model's null class (1 = off, one pass).
        autocast: a context-manager factory to run the network under (e.g. the accelerator's).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shape = sample_shape(model)
    fn = ModelFn(lambda x, t, **cond: model(x, t, **cond), process, prediction)
    xs, images = [], []
    indices = list(indices)
    for start in range(0, len(indices), int(batch)):
        chunk = indices[start : start + int(batch)]
        x_T = process.sigma(1.0).item() * image_noise(seed, chunk, shape).to(device)
        cond, mf = {}, fn
        if labels is not None:
            y = labels[start : start + len(chunk)].to(device)
            cond["y"] = y
            if cfg_scale != 1.0:
                mf = guided(fn, "cfg", cfg_scale, uncond={"y": torch.full_like(y, model.null_class)})
        ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            x0 = sample(
                mf,
                x_T,
                solver=sampler["solver"],
                steps=int(sampler["steps"]),
                schedule=sampler.get("schedule", "logsnr"),
                t_start=1.0,
                t_end=float(sampler.get("t_end", 1e-3)),
                denoise_final=True,
                **dict(sampler.get("opts") or {}),
                **cond,
            ).float()
            img = autoencoder.decode(x0).float() if autoencoder is not None else x0
        xs.append(x0)
        images.append(img.clamp(-1, 1))
    return torch.cat(xs), torch.cat(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 [0, 255] on the CPU (what a saved PNG holds)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
