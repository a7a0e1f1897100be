"""Frozen autoencoders (difftools/models/vae.py) and the VAE trainer (train/vae.py) on real images."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from difftools.models.vae import autoencoder_from_config, build_autoencoder, psnr

REPO = Path(__file__).resolve().parents[1]

# PSNR floors (dB, images in [-1, 1]). TAEF2 on 32 CIFAR-10 test images: 24.8 dB at 32px.
TAEF2_FLOOR = 22.0
# The 100-step MNIST-16px autoencoders (train/vae.py, lr 3e-3, batch 16) on 64 test images. Measured
# with torch 2.14.1 (CPU), diffusers 0.42.1, numpy 2.4.6, Python 3.11.7, Linux x86_64 (2 cores):
# KL 24.6 dB at seed 0, 20.9-25.1 dB over seeds 0-10; tiny 25.2 dB, 25.2-30.1 over seeds 0-2; the
# same KL run gave 18.4 dB on another machine with the same versions (issue 11): 100 steps at this lr
# are a chaotic trajectory, so kernel round-off moves the result by several dB. What broken
# training would give, on the same images: the untrained models 8.7 (KL) / 11.9 (tiny) dB, and the
# best constant image (the test-set mean) 14.4 dB. So the test asserts a floor 1.6 dB above that
# constant (2.4 dB below the worst run seen), and a gain over the untrained model on the same images.
# Since the recipe runs on the training engine (its resumable data order instead of a shuffled
# DataLoader's, and flips from the order's bits) seed 0 gives KL 24.0 dB and tiny 26.3 dB here.
TRAINED_FLOOR = 16.0
MIN_GAIN_OVER_UNTRAINED = 6.0


def cifar_images(shared: Path, n: int = 32) -> torch.Tensor:
    from difftools.data import build_dataset

    try:
        ds = build_dataset("cifar10", root=shared, split="test")
    except FileNotFoundError as e:
        pytest.skip(f"CIFAR-10 not available: {e}")
    return torch.stack([ds[i][0] for i in range(n)])


def taef2_or_skip(shared: Path, **kw):
    d = shared / "vae"
    if not (d / "taef2_encoder.pth").is_file():
        pytest.skip(f"TAEF2 weights not found in {d} (see docs/data.md)")
    return build_autoencoder("taef2", path=d, **kw)


def load_train_vae():
    spec = importlib.util.spec_from_file_location("train_vae", REPO / "train" / "vae.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_vae"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", params=["kl", "tiny"])
def trained(request, tmp_path_factory):
    """train/vae.py for 100 steps on MNIST (16px, 2x downsampling): a real, if small, autoencoder."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found under {SHARED_DATA / 'mnist'}")
    torch.manual_seed(0)
    cfg = OmegaConf.load(REPO / "conf" / "vae.yaml")
    cfg.pop("hydra")
    out = tmp_path_factory.mktemp(f"vae_{request.param}")
    cfg = OmegaConf.merge(
        cfg,
        {
            "data": {"name": "mnist", "root": str(SHARED_DATA), "image_size": 16, "random_flip": False},
            "model": {"type": request.param, "block_out_channels": [16, 32], "norm_num_groups": 8},
            "train": {
                "steps": 100,
                "batch_size": 16,
                "lr": 3e-3,
                "num_workers": 0,
                "num_threads": 1,
                "log_every": 1000,
                "eval_images": 128,
                "scale_images": 128,
            },
            "out": str(out),
        },
    )
    mod = load_train_vae()
    torch.manual_seed(int(cfg.train.seed))  # run() seeds the same way before building its model
    untrained = mod.build_model(cfg.model, 1).eval()
    metrics = mod.run(cfg)
    return request.param, out, metrics, untrained


# ---------------------------------------------------------------------------------------- identity
def test_identity_is_exact_noop():
    ae = build_autoencoder("identity", channels=3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)
    assert ae.latent_shape((3, 8, 8)) == (3, 8, 8) and ae.downsample == 1
    assert autoencoder_from_config(ae.config()).config() == ae.config()
    assert build_autoencoder("identity").latent_shape((1, 16, 16)) == (1, 16, 16)


def test_missing_directories_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        build_autoencoder("kl", path=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="taef2_encoder.pth"):
        build_autoencoder("taef2", path=tmp_path)
    with pytest.raises(ValueError, match="unknown autoencoder"):
        build_autoencoder("sdxl")


# ---------------------------------------------------------------------------------------- TAEF2
def test_taef2_round_trip_on_cifar10(shared_data):
    ae = taef2_or_skip(shared_data)
    x = cifar_images(shared_data)
    assert ae.scale is None  # TAEF2 defines no scale: estimated from the first encoded batch
    z = ae.encode(x)
    assert z.shape == (32, 32, 4, 4) and ae.latent_channels == 32 and ae.downsample == 8
    assert ae.scale_source == "data" and ae.config()["scale"] == pytest.approx(ae.scale)
    # scale = 1/std and shift = mean of the batch it was fitted on
    assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4)
    x_hat = ae.decode(z)
    assert x_hat.shape == x.shape
    value = psnr(x_hat.clamp(-1, 1), x).item()
    assert value > TAEF2_FLOOR, f"TAEF2 PSNR {value:.2f} dB below floor {TAEF2_FLOOR}"
    # The state dicts fill our module exactly (strict load) and everything is frozen.
    assert sum(p.numel() for p in ae.parameters()) == pytest.approx(2.68e6, rel=0.02)
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    xg = x[:2].clone().requires_grad_(True)
    assert not ae.encode(xg).requires_grad  # encode never builds a graph
    ae.train()
    assert not ae.training  # a parent's train() cannot unfreeze it


def test_taef2_features_and_per_channel_scale(shared_data):
    ae = taef2_or_skip(shared_data)
    x = cifar_images(shared_data, 16)
    ae.fit_scale(x, per_channel=True)
    z = ae.encode(x)
    per_channel_std = z.transpose(0, 1).flatten(1).std(1, unbiased=False)
    assert torch.allclose(per_channel_std, torch.ones(32), atol=1e-3)
    f = ae.features(x, "encoder")
    assert f.shape == (16, ae.feature_channels("encoder"), 4, 4) == (16, 64, 4, 4)
    assert torch.equal(ae.features(x, "latent"), z)
    assert psnr(ae.decode(z).clamp(-1, 1), x).item() > TAEF2_FLOOR  # per-channel scale round-trips too
    ae2 = autoencoder_from_config(ae.config())  # config carries the per-channel factors
    assert torch.allclose(ae2.encode(x), z, atol=1e-5) and ae2.checksum() == ae.checksum()


# ---------------------------------------------------------------------------------------- KL / tiny
def test_trained_autoencoder_round_trip_mnist(trained, shared_data):
    kind, out, metrics, untrained = trained
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert cfg["_class_name"] == ("AutoencoderKL" if kind == "kl" else "AutoencoderTiny")
    assert metrics["psnr_db"] > TRAINED_FLOOR
    ae = build_autoencoder(kind, path=out)
    # the data-estimated factors were written into the diffusers config and are picked up
    assert ae.scale == pytest.approx(metrics["scaling_factor"]) and ae.scale_source == "model"
    assert ae.shift == pytest.approx(metrics["shift_factor"])
    from difftools.data import build_dataset

    ds = build_dataset("mnist", root=shared_data, split="test", image_size=16)
    x = torch.stack([ds[i][0] for i in range(64)])
    z = ae.encode(x)
    assert z.shape == (64, 4, 8, 8) and ae.downsample == 2
    assert 0.5 < z.std().item() < 2.0  # scaled latents are roughly unit variance on held-out data
    value = psnr(ae.decode(z).clamp(-1, 1), x).item()
    with torch.no_grad():
        before = psnr(load_train_vae()._reconstruct(untrained, x, sample=False)[0].clamp(-1, 1), x).item()
    constant = psnr(x.mean(0, keepdim=True).expand_as(x), x).item()
    assert before < constant < TRAINED_FLOOR, (before, constant)  # the floor is above both failure modes
    assert value > TRAINED_FLOOR, f"{kind} PSNR {value:.2f} dB below floor {TRAINED_FLOOR}"
    assert value > before + MIN_GAIN_OVER_UNTRAINED, f"{kind}: {value:.2f} dB trained, {before:.2f} untrained"
    if kind == "kl":  # the posterior has variance: sampling differs from the mean
        g = torch.Generator().manual_seed(0)
        assert not torch.equal(ae.encode(x[:4], sample=True, generator=g), z[:4])
        assert ae.features(x[:4], "encoder").shape[1] == ae.feature_channels("encoder") == 32
    assert build_autoencoder(kind, path=out, scale="auto").scale is None


def test_psnr_definition():
    x = torch.zeros(1, 1, 4, 4)
    y = torch.full((1, 1, 4, 4), 0.2)  # MSE 0.04, range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert psnr(x, y).item() == pytest.approx(20.0, rel=1e-5)
    assert np.isfinite(psnr(x, x).item())


# ------------------------------------------------------------------------------------ recipe on the engine
def digits_vae_config(tmp_path: Path, **train):
    """A small KL autoencoder on the embedded digits (16px, flips on), writing under ``tmp_path``."""
    cfg = OmegaConf.load(REPO / "conf" / "vae.yaml")
    cfg.pop("hydra")
    train = {"steps": 6, "batch_size": 16, "lr": 1e-3, "num_workers": 0, "num_threads": 1, "log_every": 1,
             "ckpt_every": 3, "sample_every": 0, "eval_images": 32, "scale_images": 32, **train}
    return OmegaConf.merge(cfg, {
        "data": {"name": "digits", "random_flip": True},
        "model": {"type": "kl", "block_out_channels": [8, 16], "norm_num_groups": 4},
        "train": train, "out": str(tmp_path / "ae"), "run_dir": str(tmp_path / "run")})


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vae_recipe_resumes_exactly_and_its_checkpoints_load(tmp_path):
    from difftools import load
    from difftools.checkpoint import load_weights

    mod = load_train_vae()
    full = mod.run(digits_vae_config(tmp_path / "a", eval_every=3))
    step3 = tmp_path / "a" / "run" / "checkpoints" / "step_0000003"
    resumed = mod.run(digits_vae_config(tmp_path / "b", resume=str(step3)))
    # steps 4-6 after the resume are the uninterrupted run's: same batches, flips, z draws and weights
    losses = {name: {r["step"]: r["loss"] for r in jsonl(tmp_path / name / "run" / "metrics.jsonl")
                     if "loss" in r} for name in ("a", "b")}
    assert sorted(losses["b"]) == [4, 5, 6] and all(losses["b"][k] == losses["a"][k] for k in (4, 5, 6))
    weights = {name: load_weights(tmp_path / name / "ae" / "diffusion_pytorch_model.safetensors")
               for name in ("a", "b")}
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert resumed["scaling_factor"] == full["scaling_factor"] and resumed["steps"] == full["steps"] == 6
    # the engine's checkpoint (kind autoencoder) rebuilds the trained network that save_pretrained wrote
    loaded = load(tmp_path / "a" / "run")
    assert loaded.config["checkpoint"]["kind"] == "autoencoder" and loaded.step == 6
    net_state = loaded.model.net.state_dict()
    assert net_state.keys() == weights["a"].keys()
    assert all(torch.equal(net_state[k], weights["a"][k]) for k in net_state)
    # the evaluation callback measured what the final report measures, on the same held-out images
    evals = {r["step"]: r["eval/psnr_db"] for r in jsonl(tmp_path / "a" / "run" / "metrics.jsonl")
             if "eval/psnr_db" in r}
    assert sorted(evals) == [3, 6] and evals[6] == pytest.approx(full["psnr_db"], abs=1e-4)
    from PIL import Image

    with Image.open(tmp_path / "a" / "run" / "samples" / "step_0000006.png") as grid:
        assert grid.size == (8 * 18 + 2, 2 * 18 + 2)  # 8 test images above their reconstructions


def test_vae_bad_options_and_divergence_are_clear_errors(tmp_path):
    from difftools.config import ConfigError
    from difftools.training import NonFiniteLossError

    mod = load_train_vae()
    with pytest.raises(ConfigError, match=r"train\.lr='abc'"):
        mod.run(digits_vae_config(tmp_path, lr="abc"))
    cfg = digits_vae_config(tmp_path)
    cfg.model.type = "big"
    with pytest.raises(ConfigError, match=r"model\.type='big'.*'kl', 'tiny'"):
        mod.run(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "ae").exists()
    # an lr of 1e30 makes the loss NaN at step 2: the run stops, naming this recipe's options
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2.*train\.lr") as err:
        mod.run(digits_vae_config(tmp_path, lr=1e30, grad_clip=0.0))
    assert "trainer." not in str(err.value)
    assert not (tmp_path / "ae").exists()  # nothing half-trained is saved as the autoencoder
