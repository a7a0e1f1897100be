"""Sample grids during training: a fixed noise batch, the EMA model, a deterministic solver."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from samplers import ModelFn, sample
from samplers.guidance import guided


@torch.no_grad()
def sample_images(model: nn.Module, process, prediction: str, autoencoder=None, *, num_samples: int = 100,
                  solver: str = "ddim", steps: int = 50, seed: int = 0, cfg_scale: float = 1.0,
                  device=None) -> torch.Tensor:
    """Draw ``num_samples`` images in [-1, 1] with ``samplers.sample`` from x_T = sigma(1) eps.

    Class-conditional models get labels 0, 1, ..., num_classes - 1 repeated, so a grid with
    ``nrow = num_classes`` has one class per column. The noise comes from its own generator
    (seeded with ``seed``): the global RNG, and so the training run, is left untouched.
    ``cfg_scale`` != 1 applies classifier-free guidance (Ho & Salimans, arXiv 2207.12598) against
    the model's null class.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        shape = (num_samples, model.in_channels, model.input_size, model.input_size)
        g = torch.Generator(device=device).manual_seed(int(seed))
        noise = torch.randn(shape, generator=g, device=device)
        x_T = process.sigma(1.0).item() * noise  # alpha(1) x0 vanishes for every built-in process
        cond = {}
        num_classes = getattr(model, "num_classes", 0)
        if num_classes:
            cond["y"] = torch.arange(num_samples, device=device) % num_classes
        t_end = float(getattr(process, "t_min", 1e-3))
        mf = ModelFn(lambda x, t, **c: model(x, t, **c), process, prediction)
        if cfg_scale != 1.0 and num_classes:
            mf = guided(mf, "cfg", cfg_scale, uncond={"y": torch.full_like(cond["y"], model.null_class)})
        x0 = sample(mf, x_T, solver=solver, steps=steps, t_end=t_end, denoise_final=True, **cond)
        if autoencoder is not None:
            x0 = autoencoder.decode(x0)
        return x0.float().clamp(-1, 1)
    finally:
        model.train(was_training)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Write images in [-1, 1] as one PNG grid (``nrow`` images per row)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path
