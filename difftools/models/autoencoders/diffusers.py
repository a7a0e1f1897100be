"""diffusers autoencoders from a local ``save_pretrained`` directory: ``AutoencoderKL`` (``kl``) and
``AutoencoderTiny`` (``tiny``, the TAESD layout). diffusers is imported only when a model is loaded
from a path; a missing directory is a ``FileNotFoundError`` that says what to put there."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from difftools.models.autoencoders.base import Autoencoder


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
