"""The autoencoder package split (difftools/models/autoencoders/): what moved must behave as before.

Checkpoints record an autoencoder as ``ae.config()`` (backend name + keywords), never as a class path,
so configs written before the split rebuild unchanged; the TAEF2 default weight folder is found from the
new file location; ``difftools.models.vae`` still offers every name it had.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import difftools.models.autoencoders as autoencoders
import difftools.models.vae as vae
from difftools.models.autoencoders import (
    IdentityAutoencoder,
    TAEF2Autoencoder,
    autoencoder_from_config,
    default_taef2_dir,
)

REPO = Path(__file__).resolve().parents[1]


def test_default_taef2_dir_is_the_shared_data_folder(monkeypatch):
    monkeypatch.delenv("DIFFTOOLS_DATA", raising=False)
    assert default_taef2_dir() == REPO.parent / "shared" / "data" / "vae"
    monkeypatch.setenv("DIFFTOOLS_DATA", "/data/elsewhere")
    assert default_taef2_dir() == Path("/data/elsewhere/vae")


def test_identity_config_from_an_older_checkpoint_rebuilds():
    # the autoencoder node as train/dit.py wrote it before the split
    cfg = {"name": "identity", "channels": 1, "scale": 1.0, "shift": 0.0, "sample": False}
    ae = autoencoder_from_config(cfg)
    assert isinstance(ae, IdentityAutoencoder) and ae.latent_shape((1, 16, 16)) == (1, 16, 16)
    x = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    assert torch.equal(ae.decode(ae.encode(x)), x)


def test_taef2_config_from_an_older_checkpoint_rebuilds(shared_data):
    if not (shared_data / "vae" / "taef2_encoder.pth").is_file():
        pytest.skip(f"TAEF2 weights not found under {shared_data / 'vae'}")
    shift = [0.01 * k for k in range(32)]
    cfg = {"name": "taef2", "path": str(shared_data / "vae"), "scale": 0.7, "shift": shift, "sample": False}
    ae = autoencoder_from_config(cfg)
    assert isinstance(ae, TAEF2Autoencoder) and ae.scale_source == "config"
    assert ae.config() == cfg
    assert ae.latent_shape((3, 32, 32)) == (32, 4, 4)


# the public names of difftools/models/vae.py before the split
OLD_VAE_NAMES = [
    "Autoencoder", "IdentityAutoencoder", "DiffusersKLAutoencoder", "DiffusersTinyAutoencoder",
    "TAEF2Autoencoder", "build_autoencoder", "autoencoder_from_config", "default_taef2_dir", "psnr",
    "taef2_encoder", "taef2_decoder",
]


@pytest.mark.parametrize("name", OLD_VAE_NAMES)
def test_vae_module_still_offers_every_name_from_one_place(name):
    obj = getattr(vae, name)
    assert obj.__module__.split(".")[:3] == ["difftools", "models", "autoencoders"], obj.__module__


def test_registry_names():
    assert sorted(autoencoders.BACKENDS) == ["identity", "kl", "none", "taef2", "tiny"]
    with pytest.raises(ValueError, match="unknown autoencoder 'sdxl'; choose one of"):
        autoencoders.build_autoencoder("sdxl")
