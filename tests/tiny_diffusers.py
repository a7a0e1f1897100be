"""A tiny random diffusers UNet2DModel (8x8 RGB, two levels) shared by the adapter and scheduler tests."""

from __future__ import annotations

import diffusers
import torch


def tiny_unet() -> diffusers.UNet2DModel:
    """Seeded, in eval mode, float32 (call ``.double()`` for float64 comparisons)."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
