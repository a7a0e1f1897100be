"""Latent cache (difftools/data/latents.py, scripts/cache_latents.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from difftools.data import build_dataset
from difftools.data.latents import AutoencoderMismatchError, LatentDataset, cache_latents
from difftools.models.vae import build_autoencoder

REPO = Path(__file__).resolve().parents[1]


def small_kl(tmp: Path, seed: int) -> Path:
    """A randomly initialised (but real) diffusers AutoencoderKL saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    m = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
    )
    d = tmp / f"kl{seed}"
    m.save_pretrained(str(d), safe_serialization=True)
    return d


def digits(n: int = 40):
    ds = build_dataset("digits", split="test", image_size=16)
    return ds, torch.stack([ds[i][0] for i in range(n)]), torch.tensor([ds[i][1] for i in range(n)])


def test_cache_matches_on_the_fly_encoding(tmp_path):
    ds, x, y = digits(40)
    ae = build_autoencoder("kl", path=small_kl(tmp_path, 0))
    # batch 40 >= n: the cache encodes exactly the batch we compare against
    d = cache_latents(ds, ae, tmp_path / "cache" / "test", flip=True, batch_size=40, shard_size=16, limit=40)
    meta = json.loads((d / "meta.json").read_text())
    assert [s["count"] for s in meta["shards"]] == [16, 16, 8] and meta["views"] == 2
    assert meta["latent_shape"] == [4, 8, 8] and meta["autoencoder_checksum"] == ae.checksum()
    cache = build_dataset("latents", root=tmp_path / "cache", split="test")
    assert isinstance(cache, LatentDataset) and len(cache) == 40
    assert cache.info.channels == 4 and cache.info.image_size == 8 and cache.info.num_classes == 10
    z, zf = ae.encode(x), ae.encode(x.flip(-1))
    got = torch.stack([cache[i][0] for i in range(40)])
    assert torch.equal(got, z)
    assert [cache[i][1] for i in range(40)] == y.tolist()
    assert torch.equal(cache[(3, True)][0], z[3])  # without random_flip the key's flip is ignored
    flipping = LatentDataset(tmp_path / "cache", split="test", random_flip=True)
    # the mirror view is the encoding of the mirrored image, not the mirrored latent
    assert torch.equal(flipping[(3, True)][0], zf[3]) and torch.equal(flipping[(3, False)][0], z[3])
    assert not torch.allclose(zf[3], z[3].flip(-1), atol=1e-3)
    torch.manual_seed(0)
    views = {bool(torch.equal(flipping[5][0], zf[5])) for _ in range(20)}
    assert views == {True, False}


def test_cache_refuses_another_autoencoder(tmp_path):
    ds, _, _ = digits(8)
    a, b = small_kl(tmp_path, 0), small_kl(tmp_path, 1)
    ae_a = build_autoencoder("kl", path=a)
    cache_latents(ds, ae_a, tmp_path / "c", flip=False, batch_size=8, limit=8)
    LatentDataset(tmp_path / "c", autoencoder=build_autoencoder("kl", path=a))  # same weights: fine
    with pytest.raises(AutoencoderMismatchError, match="re-create the cache"):
        LatentDataset(tmp_path / "c", autoencoder=build_autoencoder("kl", path=b))
    with pytest.raises(AutoencoderMismatchError, match="'identity'"):
        build_dataset("latents", root=tmp_path / "c", autoencoder=build_autoencoder("identity"))
    # one changed weight is enough to be refused
    other = build_autoencoder("kl", path=a)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(AutoencoderMismatchError):
        LatentDataset(tmp_path / "c", autoencoder=other)
    # random_flip needs flipped views; the rebuilt autoencoder carries the cache's scale
    with pytest.raises(ValueError, match="no flipped views"):
        LatentDataset(tmp_path / "c", random_flip=True)
    rebuilt = LatentDataset(tmp_path / "c").autoencoder()
    assert rebuilt.scale == ae_a.scale and rebuilt.checksum() == ae_a.checksum()


def test_cache_estimates_scale_and_detects_corruption(tmp_path):
    ds, x, _ = digits(16)
    ae = build_autoencoder("kl", path=small_kl(tmp_path, 0), scale="auto")
    assert ae.scale is None
    d = cache_latents(ds, ae, tmp_path / "c", flip=False, batch_size=16, limit=16, scale_images=16)
    z = torch.stack([LatentDataset(d)[i][0] for i in range(16)])
    assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)  # fitted on these 16 images
    meta = json.loads((d / "meta.json").read_text())
    assert meta["autoencoder"]["scale"] == pytest.approx(ae.scale) and ae.scale_source == "data"
    shard = d / meta["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        LatentDataset(d)
    with pytest.raises(FileNotFoundError, match="cache_latents.py"):
        LatentDataset(tmp_path / "missing")


def test_cache_script_with_taef2(tmp_path, shared_data):
    if not (shared_data / "vae" / "taef2_encoder.pth").is_file():
        pytest.skip("TAEF2 weights not in shared data")
    sys.path.insert(0, str(REPO / "scripts"))
    import cache_latents as script

    report = script.main(
        [
            "--data",
            "digits",
            "--image-size",
            "16",
            "--vae",
            "identity",
            "--out",
            str(tmp_path / "id"),
            "--splits",
            "train",
            "test",
            "--limit",
            "12",
            "--device",
            "cpu",
        ]
    )
    assert report["train"]["items"] == 12 and report["test"]["latent_shape"] == [1, 16, 16]
    report = script.main(
        [
            "--data",
            "cifar10",
            "--root",
            str(shared_data),
            "--vae",
            "taef2",
            "--out",
            str(tmp_path / "t"),
            "--limit",
            "8",
            "--device",
            "cpu",
            "--batch-size",
            "8",
        ]
    )
    assert report["train"]["latent_shape"] == [32, 4, 4]
    cache = LatentDataset(tmp_path / "t", autoencoder=build_autoencoder("taef2", path=shared_data / "vae"))
    assert len(cache) == 8 and cache.source_info["name"] == "cifar10"
