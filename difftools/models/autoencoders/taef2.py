"""TAEF2, the tiny autoencoder of the FLUX.2 latent space (madebyollin/taesd, MIT).

32 latent channels, 8x downsampling, weights as two plain ``nn.Sequential`` state dicts
(``taef2_encoder.pth`` / ``taef2_decoder.pth``). The modules below are our own definition of that
architecture, written to match the state-dict layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from difftools.files import DATA_DOCS, data_root_setting, data_roots
from difftools.models.autoencoders.base import Autoencoder

FILES = ("taef2_encoder.pth", "taef2_decoder.pth")


def _conv3(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _TanhClamp(nn.Module):
    """Soft clamp of latents to (-3, 3): 3 tanh(z / 3), the decoder's first layer."""

    def forward(self, z):
        return 3.0 * torch.tanh(z / 3.0)


class _TinyBlock(nn.Module):
    """Residual block: relu(conv3(relu(conv3(relu(conv3(x))))) + x), optionally after a global mixer.

    The mixer (``pool``; FLUX.2 variant only) adds a 1x1 bottleneck with GroupNorm(4) whose statistics
    span the whole image, x <- x + W2 relu(GN(W1 x)); it lets the tiny model track the global
    normalisation of the FLUX.2 latent space.
    """

    def __init__(self, ch: int = 64, global_mix: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv3(ch, ch), nn.ReLU(), _conv3(ch, ch), nn.ReLU(), _conv3(ch, ch))
        self.pool = None
        if global_mix:
            self.pool = nn.Sequential(
                nn.Conv2d(ch, 4 * ch, 1, bias=False),
                nn.GroupNorm(4, 4 * ch),
                nn.ReLU(),
                nn.Conv2d(4 * ch, ch, 1, bias=False),
            )

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


def taef2_encoder(latent_channels: int = 32, ch: int = 64) -> nn.Sequential:
    """Image in [0, 1] -> raw FLUX.2-space latent, 8x smaller. Indices match the released state dict."""
    down = lambda: _conv3(ch, ch, stride=2, bias=False)
    return nn.Sequential(
        _conv3(3, ch),
        _TinyBlock(ch),  # 0-1   full res
        down(),
        _TinyBlock(ch),
        _TinyBlock(ch),
        _TinyBlock(ch),  # 2-5   1/2
        down(),
        _TinyBlock(ch),
        _TinyBlock(ch),
        _TinyBlock(ch),  # 6-9   1/4
        down(),
        *[_TinyBlock(ch, global_mix=True) for _ in range(3)],  # 10-13 1/8
        _conv3(ch, latent_channels),  # 14
    )


def taef2_decoder(latent_channels: int = 32, ch: int = 64) -> nn.Sequential:
    """Raw latent -> image in about [0, 1], 8x larger. Indices match the released state dict."""
    up = lambda: [nn.Upsample(scale_factor=2), _conv3(ch, ch, bias=False)]
    return nn.Sequential(
        _TanhClamp(),
        _conv3(latent_channels, ch),
        nn.ReLU(),  # 0-2
        *[_TinyBlock(ch, global_mix=True) for _ in range(3)],
        *up(),  # 3-7
        _TinyBlock(ch),
        _TinyBlock(ch),
        _TinyBlock(ch),
        *up(),  # 8-12
        _TinyBlock(ch),
        _TinyBlock(ch),
        _TinyBlock(ch),
        *up(),  # 13-17
        _TinyBlock(ch),
        _conv3(ch, 3),  # 18-19
    )


def taef2_dirs(path=None) -> list[Path]:
    """Folders searched for the weights: ``path`` if given, else ``vae/`` under the data root
    ($DIFFTOOLS_DATA; :func:`~difftools.data.base.data_roots`)."""
    if path is not None:
        return [Path(os.path.expanduser(str(path)))]
    return [r / "vae" for r in data_roots()]


def default_taef2_dir() -> Path:
    """The first folder of :func:`taef2_dirs` holding both weight files, else the first one."""
    dirs = taef2_dirs()
    return next((d for d in dirs if all((d / f).is_file() for f in FILES)), dirs[0])


def _weights_missing(path, dirs: list[Path]) -> FileNotFoundError:
    tried = "\n  ".join(str(d / f) for d in dirs for f in FILES)
    now = f"now path={path}" if path is not None else data_root_setting()
    return FileNotFoundError(
        f"TAEF2 weights not found. Looked for:\n  {tried}\nDownload taef2_encoder.pth and "
        "taef2_decoder.pth from github.com/madebyollin/taesd into one folder and pass path=<folder> "
        "(Hydra: vae.path=<folder>), or put them in <data folder>/vae/ and set DIFFTOOLS_DATA=<data "
        f"folder> ({now}). See {DATA_DOCS} for the files and their checksums."
    )


class TAEF2Autoencoder(Autoencoder):
    """TAEF2 (madebyollin/taesd): tiny distilled autoencoder of the FLUX.2 VAE latent space.

    32 latent channels, 8x downsampling, deterministic. The released networks map images in [0, 1];
    we take and return [-1, 1]. FLUX.2 normalises its latents with dataset statistics outside the VAE,
    so TAEF2 defines no scale: it is estimated from data (``fit_scale``) unless given.
    """

    name = "taef2"
    latent_channels = 32
    downsample = 8
    in_channels = 3

    def __init__(self, path=None, scale=None, shift=None, sample=False, dtype=torch.float32, **_ignored):
        super().__init__(scale, shift, sample)
        dirs = taef2_dirs(path)
        d = next((d for d in dirs if all((d / f).is_file() for f in FILES)), None)
        if d is None:
            raise _weights_missing(path, dirs)
        enc_f, dec_f = (d / f for f in FILES)
        self.path = str(d)
        self.encoder = taef2_encoder(self.latent_channels)
        self.decoder = taef2_decoder(self.latent_channels)
        # Released weights are fp16; compute in float32 unless asked otherwise.
        self.encoder.load_state_dict(torch.load(enc_f, map_location="cpu", weights_only=True))
        self.decoder.load_state_dict(torch.load(dec_f, map_location="cpu", weights_only=True))
        self.to(dtype)
        self.freeze()

    def _encode_raw(self, x):
        return self.encoder(x.add(1.0).mul(0.5)), None

    def _decode_raw(self, z):
        return self.decoder(z).mul(2.0).sub(1.0)

    def _features_raw(self, x, name):
        # Last hidden map before the projection to 32 latent channels (64 channels, 1/8 resolution).
        return self.encoder[:-1](x.add(1.0).mul(0.5))

    def _encoder_feature_channels(self):
        return self.encoder[-1].in_channels

    def _config(self):
        return {"path": self.path}
