"""Frozen autoencoders for latent diffusion: one interface over several backends.

Backends (``build_autoencoder(name, **kw)``; a checkpoint records ``ae.config()``, i.e. this name
and the constructor keywords, never a class path, and ``autoencoder_from_config`` rebuilds it):

- ``identity``: pixel space, a real no-op (encode = decode = identity, scale 1, shift 0).
- ``kl``: diffusers ``AutoencoderKL`` from a local directory (``save_pretrained`` layout). The latent
  distribution is a diagonal Gaussian; ``encode`` uses its mean unless ``sample=True``.
- ``tiny``: diffusers ``AutoencoderTiny`` (TAESD layout) from a local directory.
- ``taef2``: TAEF2, the tiny autoencoder for the FLUX.2 latent space (:mod:`.taef2`).

Modules: :mod:`.base` (the interface, the identity, ``psnr``), :mod:`.diffusers`, :mod:`.taef2`, and
:mod:`.trainable` (a fresh diffusers autoencoder to train with ``train/vae.py``: ``TrainableAutoencoder``,
PSNR and latent-factor estimates).
"""

from __future__ import annotations

from difftools.models.autoencoders.base import Autoencoder, IdentityAutoencoder, psnr
from difftools.models.autoencoders.diffusers import DiffusersKLAutoencoder, DiffusersTinyAutoencoder
from difftools.models.autoencoders.taef2 import TAEF2Autoencoder, default_taef2_dir
from difftools.models.autoencoders.trainable import TrainableAutoencoder

__all__ = [
    "BACKENDS",
    "Autoencoder",
    "IdentityAutoencoder",
    "DiffusersKLAutoencoder",
    "DiffusersTinyAutoencoder",
    "TAEF2Autoencoder",
    "TrainableAutoencoder",
    "build_autoencoder",
    "autoencoder_from_config",
    "default_taef2_dir",
    "psnr",
]

BACKENDS = {
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
    if key not in BACKENDS:
        raise ValueError(f"unknown autoencoder {name!r}; choose one of {sorted(BACKENDS)}")
    kw = {k: v for k, v in kw.items() if k != "name"}
    if "scale" in kw and isinstance(kw["scale"], str) and kw["scale"] == "auto":
        kw["scale"] = None  # "auto": always estimate from data, ignoring the model's own factor
        ae = BACKENDS[key](**kw)
        ae.scale, ae.scale_source = None, None
        return ae
    return BACKENDS[key](**kw)


def autoencoder_from_config(cfg: dict | None) -> Autoencoder:
    """Inverse of ``Autoencoder.config()``; ``None`` gives the identity."""
    if cfg is None:
        return IdentityAutoencoder()
    cfg = dict(cfg)
    ae = build_autoencoder(cfg.pop("name", "identity"), **cfg)
    if cfg.get("scale") is not None:
        ae.scale_source = "config"
    return ae
