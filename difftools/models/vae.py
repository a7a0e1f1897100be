"""Frozen autoencoders: re-exported from :mod:`difftools.models.autoencoders`, where they live
(``base``: the interface, the identity and ``psnr``; ``diffusers``: KL and tiny; ``taef2``; the
registry in its ``__init__``). Kept so ``from difftools.models.vae import build_autoencoder`` works.
Checkpoints record an autoencoder by name and keywords (``ae.config()``), not by class path, so the
move changes nothing on disk.
"""

from difftools.models.autoencoders import (
    BACKENDS,
    Autoencoder,
    DiffusersKLAutoencoder,
    DiffusersTinyAutoencoder,
    IdentityAutoencoder,
    TAEF2Autoencoder,
    autoencoder_from_config,
    build_autoencoder,
    default_taef2_dir,
    psnr,
)
from difftools.models.autoencoders.taef2 import taef2_decoder, taef2_encoder

__all__ = [
    "BACKENDS",
    "Autoencoder",
    "IdentityAutoencoder",
    "DiffusersKLAutoencoder",
    "DiffusersTinyAutoencoder",
    "TAEF2Autoencoder",
    "build_autoencoder",
    "autoencoder_from_config",
    "default_taef2_dir",
    "psnr",
    "taef2_decoder",
    "taef2_encoder",
]
