"""A fresh diffusers autoencoder to train (``train/vae.py``), and what is measured on it afterwards.

* :func:`new_diffusers_autoencoder` builds an untrained ``AutoencoderKL`` (``kl``) or
  ``AutoencoderTiny`` (``tiny``, the TAESD layout) from a few sizes.
* :class:`TrainableAutoencoder` holds one as ``.net`` and can be rebuilt from its ``config()``, so the
  training engine's checkpoints (``kind: autoencoder``) load with ``difftools.load``. Its forward is
  the reconstruction ``(x_hat, KL per image or None)`` the training loss needs.
* :func:`reconstruct`, :func:`evaluate_psnr` and :func:`estimate_factors` work on the bare diffusers
  model (the one ``save_pretrained`` writes and ``build_autoencoder("kl", path=...)`` reads).

diffusers is imported only when a model is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from difftools.models.autoencoders.base import psnr
from difftools.models.registry import register_rebuildable

TYPES = ("kl", "tiny")


def new_diffusers_autoencoder(type: str, channels: int, block_out_channels: Sequence[int],
                              layers_per_block: int = 1, latent_channels: int = 4, norm_num_groups: int = 32,
                              mid_block_add_attention: bool = False) -> nn.Module:
    """An untrained diffusers autoencoder with ``2 ** (len(block_out_channels) - 1)`` x downsampling.

    ``kl``: ``AutoencoderKL`` with one down / up block per width. ``tiny``: ``AutoencoderTiny`` at one
    constant width (the last) through all stages (diffusers' tiny blocks do not change width), with
    ``layers_per_block`` blocks per stage; ``norm_num_groups`` and ``mid_block_add_attention`` are
    KL-only.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny

    ch = [int(c) for c in block_out_channels]
    if type == "kl":
        n = len(ch)
        return AutoencoderKL(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(ch),
            layers_per_block=int(layers_per_block),
            latent_channels=int(latent_channels),
            norm_num_groups=int(norm_num_groups),
            mid_block_add_attention=bool(mid_block_add_attention),
        )
    if type == "tiny":
        n, width = len(ch), ch[-1]
        blocks = tuple(int(layers_per_block) for _ in range(n))
        return AutoencoderTiny(
            in_channels=channels,
            out_channels=channels,
            encoder_block_out_channels=(width,) * n,
            decoder_block_out_channels=(width,) * n,
            num_encoder_blocks=blocks,
            num_decoder_blocks=blocks,
            latent_channels=int(latent_channels),
        )
    raise ValueError(f"model.type must be one of {TYPES}, got {type!r}")


def reconstruct(model: nn.Module, x: torch.Tensor, sample: bool, generator: torch.Generator | None = None):
    """``(x_hat, kl)`` of a diffusers autoencoder: decode z ~ q(z|x) (``sample``; drawn from
    ``generator``) or its mode; kl = KL(q(z|x) || N(0, I)) per image, None for AutoencoderTiny
    (deterministic latents)."""
    out = model.encode(x)
    if hasattr(out, "latent_dist"):
        dist = out.latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return model.decode(z).sample, dist.kl()
    return model.decode(out.latents).sample, None


def encode_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The posterior mean (KL) or the latents (tiny) of a diffusers autoencoder."""
    out = model.encode(x)
    return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents


def _image_batches(dataset, n: int, batch_size: int):
    n = min(n, len(dataset))
    for i in range(0, n, batch_size):
        yield torch.stack([dataset[j][0] for j in range(i, min(n, i + batch_size))])


@torch.no_grad()
def evaluate_psnr(model: nn.Module, dataset, n: int, device, batch_size: int = 128) -> float:
    """Mean per-image PSNR (dB, images in [-1, 1], outputs clamped) of mean-latent reconstructions of
    the first ``n`` items of ``dataset``. Leaves the model in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for x in _image_batches(dataset, n, batch_size):
        x = x.to(device)
        x_hat, _ = reconstruct(model, x, sample=False)
        total += float(psnr(x_hat.clamp(-1, 1), x)) * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def estimate_factors(model: nn.Module, dataset, n: int, device, batch_size: int = 128) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1/std, mean) of the posterior means of the first ``n`` items."""
    zs = [encode_mean(model, x.to(device)).float().cpu() for x in _image_batches(dataset, n, batch_size)]
    z = torch.cat(zs)
    mean = float(z.mean())
    return 1.0 / float((z - mean).std()), mean


@register_rebuildable
class TrainableAutoencoder(nn.Module):
    """A diffusers autoencoder (``.net``, :func:`new_diffusers_autoencoder`'s arguments) that the
    engine trains and checkpoints; ``forward(x, sample, generator) -> (x_hat, kl or None)``."""

    def __init__(self, type: str, channels: int, block_out_channels: Sequence[int], layers_per_block: int = 1,
                 latent_channels: int = 4, norm_num_groups: int = 32, mid_block_add_attention: bool = False):
        super().__init__()
        self._config = dict(type=type, channels=int(channels),
                            block_out_channels=[int(c) for c in block_out_channels],
                            layers_per_block=int(layers_per_block), latent_channels=int(latent_channels),
                            norm_num_groups=int(norm_num_groups),
                            mid_block_add_attention=bool(mid_block_add_attention))
        self.net = new_diffusers_autoencoder(**self._config)
        self.downsample = 2 ** (len(self._config["block_out_channels"]) - 1)

    def config(self) -> dict:
        return dict(self._config)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        return reconstruct(self.net, x, sample, generator)
