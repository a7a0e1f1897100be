"""The frozen-autoencoder interface (scaled latents, scale estimation, alignment features), the
pixel-space identity, and PSNR to judge reconstructions.

Latent diffusion (Rombach et al., arXiv 2112.10752) trains the denoiser on ``z = (E(x) - shift) * scale``
where E is a frozen autoencoder's encoder and ``scale`` makes the latents roughly unit variance
(``scale = 1 / std(E(x))`` estimated on training images when the model does not define one; SD's
0.18215 was obtained exactly this way). Samples are decoded with ``D(z / scale + shift)``.

Every autoencoder is frozen (``eval()``, ``requires_grad_(False)``) and ``encode`` runs without
autograd. ``decode`` keeps autograd on its input so that losses through the decoder (e.g. a classifier
on decoded images) can still reach the latent.

``features(x, name)`` returns the feature map that VAE-feature alignment (SRA², arXiv 2601.17830)
regresses onto: ``"latent"`` is the scaled clean latent itself (the paper's target, free when latents
are cached); ``"encoder"`` is the encoder's last hidden feature map at latent resolution (before the
projection to latent channels).
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean over the batch of per-image PSNR = 10 log10(range^2 / MSE); images in [-1, 1] have range 2."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return (10.0 * torch.log10(data_range**2 / mse)).mean()


def _as_float_or_list(v):
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [float(a) for a in v]
    return float(v)


class Autoencoder(nn.Module, ABC):
    """Frozen autoencoder with scaled latents ``z = (E(x) - shift) * scale``.

    Subclasses implement ``_encode_raw(x) -> (mean, logvar or None)``, ``_decode_raw(z_raw) -> x``,
    ``_features_raw(x, name)`` and ``_config()``. ``scale`` / ``shift`` are floats or per-channel lists;
    ``None`` means "not defined by the model": it is then estimated from the first batch passed to
    :meth:`encode` (or explicitly with :meth:`fit_scale`) and recorded in :meth:`config`.
    """

    name: str = "base"
    latent_channels: int | None
    downsample: int
    in_channels: int | None

    def __init__(self, scale=None, shift=None, sample: bool = False):
        super().__init__()
        self.scale = _as_float_or_list(scale)
        self.shift = _as_float_or_list(shift)
        # How scale was obtained: "model" (the model's own config), "user", "data" (estimated) or None.
        self.scale_source = None if scale is None else "user"
        self.sample = bool(sample)
        self._checksum: str | None = None

    # ------------------------------------------------------------------ freezing
    def freeze(self) -> Autoencoder:
        """eval() + requires_grad False on all parameters; the autoencoder is never trained here."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # noqa: D401 - frozen: ignore train() requests
        """Always stays in eval mode (frozen); ``train(True)`` from a parent module is ignored."""
        return super().train(False)

    # ------------------------------------------------------------------ scale / shift
    def _factor(self, v, like: torch.Tensor, default: float) -> torch.Tensor | float:
        if v is None:
            return default
        if isinstance(v, list):
            return torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return v

    @torch.no_grad()
    def fit_scale(self, x: torch.Tensor, per_channel: bool = False, fit_shift: bool = True) -> Autoencoder:
        """Estimate ``shift = mean(E(x))`` and ``scale = 1 / std(E(x))`` on a batch of images in [-1, 1].

        Per-channel statistics when ``per_channel`` (useful for 32-channel latents such as FLUX.2's).
        """
        mean, _ = self._encode_raw(x)
        z = mean.float()
        dims = (0, 2, 3) if per_channel else None
        if per_channel:
            mu = z.mean(dim=dims) if fit_shift else torch.zeros(z.shape[1])
            sd = (z - mu.view(1, -1, 1, 1)).pow(2).mean(dim=dims).sqrt()
            self.shift = mu.tolist() if fit_shift else 0.0
            self.scale = (1.0 / sd.clamp_min(1e-6)).tolist()
        else:
            mu = z.mean() if fit_shift else torch.zeros(())
            sd = (z - mu).pow(2).mean().sqrt()
            self.shift = float(mu) if fit_shift else 0.0
            self.scale = float(1.0 / sd.clamp_min(1e-6))
        self.scale_source = "data"
        log.info(
            "%s autoencoder: estimated scale=%s shift=%s from %d images",
            self.name,
            self.scale,
            self.shift,
            x.shape[0],
        )
        return self

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents ``(E(x) - shift) * scale`` (mean of q(z|x) unless sample)."""
        mean, logvar = self._encode_raw(x)
        z = mean
        if (self.sample if sample is None else sample) and logvar is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        if self.scale is None:
            # The model defines no scale: estimate it from this (first) batch of training images.
            self.fit_scale(x)
        return (z - self._factor(self.shift, z, 0.0)) * self._factor(self.scale, z, 1.0)

    @torch.no_grad()
    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw (unscaled) posterior (mean, logvar); logvar is None for deterministic encoders."""
        return self._encode_raw(x)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1] (autograd kept on the input)."""
        if self.scale is None:
            raise RuntimeError(
                f"{self.name} autoencoder has no latent scale yet: call ae.fit_scale(images) or "
                "encode a batch of training images first, or pass scale=... to build_autoencoder"
            )
        z = latent / self._factor(self.scale, latent, 1.0) + self._factor(self.shift, latent, 0.0)
        return self._decode_raw(z)

    @torch.no_grad()
    def features(self, x: torch.Tensor, name: str = "latent") -> torch.Tensor:
        """Feature map at latent resolution for alignment: "latent" (scaled) or "encoder" (hidden)."""
        if name == "latent":
            return self.encode(x)
        if name == "encoder":
            return self._features_raw(x, name)
        raise ValueError(f"unknown feature name {name!r}; choose 'latent' or 'encoder'")

    def feature_channels(self, name: str = "latent") -> int | None:
        """Number of channels of :meth:`features` (None for identity = same as the input)."""
        if name == "latent":
            return self.latent_channels
        if name == "encoder":
            return self._encoder_feature_channels()
        raise ValueError(f"unknown feature name {name!r}; choose 'latent' or 'encoder'")

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        """(C, H, W) of an image -> (C, H, W) of its latent."""
        c, h, w = image_shape
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"image size {h}x{w} not divisible by the {self.name} downsampling factor {self.downsample}"
            )
        lc = c if self.latent_channels is None else self.latent_channels
        return (lc, h // self.downsample, w // self.downsample)

    def config(self) -> dict:
        """Plain dict that rebuilds this autoencoder with ``autoencoder_from_config``."""
        cfg = {
            "name": self.name,
            **self._config(),
            "scale": self.scale,
            "shift": self.shift,
            "sample": self.sample,
        }
        return cfg

    def checksum(self) -> str:
        """sha256 over the weights (sorted names, shapes and float32 bytes); identifies the autoencoder."""
        if self._checksum is None:
            h = hashlib.sha256(self.name.encode())
            for k, v in sorted(self.state_dict().items()):
                t = v.detach().to("cpu", torch.float32).contiguous()
                h.update(k.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.numpy().tobytes())
            self._checksum = h.hexdigest()
        return self._checksum

    # ------------------------------------------------------------------ for subclasses
    @abstractmethod
    def _encode_raw(self, x):
        """Backend encoder: image in [-1, 1] -> unscaled latent (mean or sample)."""

    @abstractmethod
    def _decode_raw(self, z):
        """Backend decoder: unscaled latent -> image in ~[-1, 1]."""

    @abstractmethod
    def _features_raw(self, x, name):
        """Backend feature maps named ``name`` for the alignment loss."""

    @abstractmethod
    def _encoder_feature_channels(self):
        """Channel count of the encoder feature map used by ``features="encoder"``."""

    def _config(self) -> dict:
        return {}


# ------------------------------------------------------------------------------------ identity
class IdentityAutoencoder(Autoencoder):
    """Pixel space: encode(x) = x, decode(z) = z, scale 1, shift 0, downsample 1."""

    name = "identity"

    def __init__(self, channels: int | None = None, **_ignored):
        super().__init__(scale=1.0, shift=0.0)
        self.scale_source = "model"
        self.latent_channels = channels
        self.in_channels = channels
        self.downsample = 1

    def _encode_raw(self, x):
        return x, None

    def _decode_raw(self, z):
        return z

    def _features_raw(self, x, name):
        return x

    def _encoder_feature_channels(self):
        return self.latent_channels

    def _config(self):
        return {"channels": self.latent_channels}
