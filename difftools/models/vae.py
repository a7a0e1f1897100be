"""Frozen autoencoders for latent diffusion: one interface over several backends.

Latent diffusion (Rombach et al., arXiv 2112.10752) trains the denoiser on ``z = (E(x) - shift) * scale``
where E is a frozen autoencoder's encoder and ``scale`` makes the latents roughly unit variance
(``scale = 1 / std(E(x))`` estimated on training images when the model does not define one; SD's
0.18215 was obtained exactly this way). Samples are decoded with ``D(z / scale + shift)``.

Backends (``build_autoencoder(name, **kw)``):

- ``identity``: pixel space, a real no-op (encode = decode = identity, scale 1, shift 0).
- ``kl``: diffusers ``AutoencoderKL`` from a local directory (``save_pretrained`` layout). The latent
  distribution is a diagonal Gaussian; ``encode`` uses its mean unless ``sample=True``.
- ``tiny``: diffusers ``AutoencoderTiny`` (TAESD layout) from a local directory.
- ``taef2``: TAEF2, the tiny autoencoder for the FLUX.2 latent space (madebyollin/taesd, MIT):
  32 latent channels, 8x downsampling, weights as two plain ``nn.Sequential`` state dicts
  (``taef2_encoder.pth`` / ``taef2_decoder.pth``). The module below is our own definition of that
  architecture, written to match the state-dict layout.

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
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

__all__ = [
    "Autoencoder",
    "IdentityAutoencoder",
    "DiffusersKLAutoencoder",
    "DiffusersTinyAutoencoder",
    "TAEF2Autoencoder",
    "build_autoencoder",
    "autoencoder_from_config",
    "default_taef2_dir",
    "psnr",
]


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


# ====================================================================== identity
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


# ====================================================================== diffusers
def _check_dir(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"build_autoencoder({what!r}) needs path=<local diffusers directory>")
    p = Path(os.path.expanduser(str(path)))
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} autoencoder: no diffusers directory at {p} (expected {p / 'config.json'} and "
            "diffusion_pytorch_model.safetensors). Save one with model.save_pretrained(dir), e.g. "
            "train one with `python train/vae.py`, and pass its path (vae.path=...)."
        )
    return p


class _DiffusersAutoencoder(Autoencoder):
    def __init__(self, model: nn.Module, path: str | None, scale=None, shift=None, sample=False):
        cfg = model.config
        model_scale = getattr(cfg, "scaling_factor", None)
        model_shift = getattr(cfg, "shift_factor", None)
        super().__init__(
            scale if scale is not None else model_scale,
            shift if shift is not None else (model_shift or 0.0),
            sample,
        )
        if scale is None and model_scale is not None:
            self.scale_source = "model"
        self.model = model
        self.path = None if path is None else str(path)
        self.latent_channels = int(cfg.latent_channels)
        self.in_channels = int(cfg.in_channels)
        self.freeze()

    def _config(self):
        return {"path": self.path}

    def _hooked(self, module: nn.Module, run):
        store = {}
        handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("h", o))
        try:
            run()
        finally:
            handle.remove()
        return store["h"]


class DiffusersKLAutoencoder(_DiffusersAutoencoder):
    """diffusers ``AutoencoderKL``; q(z|x) = N(mean, exp(logvar)); encode uses the mean by default."""

    name = "kl"

    def __init__(self, path=None, model=None, scale=None, shift=None, sample=False, **_ignored):
        if model is None:
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_pretrained(str(_check_dir(path, "kl")), local_files_only=True)
        super().__init__(model, path, scale, shift, sample)
        self.downsample = 2 ** (len(model.config.block_out_channels) - 1)

    def _encode_raw(self, x):
        dist = self.model.encode(x).latent_dist
        return dist.mean, dist.logvar

    def _decode_raw(self, z):
        return self.model.decode(z).sample

    def _features_raw(self, x, name):
        # Output of the encoder's mid block: the deepest hidden map, at latent resolution.
        return self._hooked(self.model.encoder.mid_block, lambda: self.model.encoder(x))

    def _encoder_feature_channels(self):
        return int(self.model.config.block_out_channels[-1])


class DiffusersTinyAutoencoder(_DiffusersAutoencoder):
    """diffusers ``AutoencoderTiny`` (TAESD family); deterministic encoder, images in [-1, 1]."""

    name = "tiny"

    def __init__(self, path=None, model=None, scale=None, shift=None, sample=False, **_ignored):
        if model is None:
            from diffusers import AutoencoderTiny

            model = AutoencoderTiny.from_pretrained(str(_check_dir(path, "tiny")), local_files_only=True)
        super().__init__(model, path, scale, shift, sample)
        self.downsample = 2 ** (len(model.config.num_encoder_blocks) - 1)

    def _encode_raw(self, x):
        return self.model.encode(x).latents, None

    def _decode_raw(self, z):
        return self.model.decode(z).sample

    def _features_raw(self, x, name):
        return self._hooked(self.model.encoder.layers[-2], lambda: self.model.encoder(x))

    def _encoder_feature_channels(self):
        return int(self.model.config.encoder_block_out_channels[-1])


# ====================================================================== TAEF2
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


def default_taef2_dir() -> Path:
    """$DIFFTOOLS_DATA/vae, else ../shared/data/vae relative to the repository."""
    env = os.environ.get("DIFFTOOLS_DATA")
    if env:
        return Path(env) / "vae"
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "vae"


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
        d = Path(os.path.expanduser(str(path))) if path is not None else default_taef2_dir()
        enc_f, dec_f = d / "taef2_encoder.pth", d / "taef2_decoder.pth"
        for f in (enc_f, dec_f):
            if not f.is_file():
                raise FileNotFoundError(
                    f"TAEF2 weights not found: {f}. Copy taef2_encoder.pth and taef2_decoder.pth from "
                    "github.com/madebyollin/taesd into that folder, or pass path=<folder> "
                    "(default: $DIFFTOOLS_DATA/vae or ../shared/data/vae)."
                )
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


# ====================================================================== factory
_BACKENDS = {
    "identity": IdentityAutoencoder,
    "none": IdentityAutoencoder,
    "kl": DiffusersKLAutoencoder,
    "tiny": DiffusersTinyAutoencoder,
    "taef2": TAEF2Autoencoder,
}


def build_autoencoder(name: str = "identity", **kw) -> Autoencoder:
    """Build a frozen autoencoder by name: identity | kl | tiny | taef2.

    Keyword arguments: ``path`` (local directory: diffusers ``save_pretrained`` layout for kl/tiny,
    folder holding taef2_{encoder,decoder}.pth for taef2), ``scale`` / ``shift`` (override the model's
    factors; None = the model's own, else estimated from the first encoded batch), ``sample`` (encode
    draws from q(z|x) instead of its mean; KL only), ``channels`` (identity only: image channels).
    Unknown keys such as ``name`` are ignored so a config dict can be splatted in.
    """
    key = (name or "identity").lower()
    if key not in _BACKENDS:
        raise ValueError(f"unknown autoencoder {name!r}; choose one of {sorted(_BACKENDS)}")
    kw = {k: v for k, v in kw.items() if k != "name"}
    if "scale" in kw and isinstance(kw["scale"], str) and kw["scale"] == "auto":
        kw["scale"] = None  # "auto": always estimate from data, ignoring the model's own factor
        ae = _BACKENDS[key](**kw)
        ae.scale, ae.scale_source = None, None
        return ae
    return _BACKENDS[key](**kw)


def autoencoder_from_config(cfg: dict | None) -> Autoencoder:
    """Inverse of ``Autoencoder.config()``; ``None`` gives the identity."""
    if cfg is None:
        return IdentityAutoencoder()
    cfg = dict(cfg)
    ae = build_autoencoder(cfg.pop("name", "identity"), **cfg)
    if cfg.get("scale") is not None:
        ae.scale_source = "config"
    return ae
