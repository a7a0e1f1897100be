"""Batch augmentations on the device, every random number drawn from a given CPU generator (so a
run that keeps the generator's state is reproducible and resumable, whatever the device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``x`` [B, C, H, W] left-right with probability 1/2 (B uniform draws)."""
    mask = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels in each direction: reflect padding, then a
    random crop per image (draws B row offsets, then B column offsets). ``shift=0`` returns x."""
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator, device="cpu").to(x.device)
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, :, None]  # [B, H, 1]
    cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, :]  # [B, 1, W]
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)
