"""Sharded safetensors (the transformers / diffusers index layout) in checkpoints: written above a size
threshold, read transparently by load_weights and difftools.load, each shard verified by its own sha256."""

from __future__ import annotations

import json
import re

import pytest
import torch

import difftools
from difftools import checkpoint as ckpt_io
from difftools.checkpoint import CheckpointError
from difftools.models.dit import DiT
from samplers.process import Flow


def small_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def outputs(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.3, 0.8]), torch.tensor([0, 3]))


def nbytes(state) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


@pytest.fixture
def sharded(tmp_path):
    model = small_dit()
    path = ckpt_io.save_checkpoint(tmp_path / "ckpt", model, process=Flow(), prediction="flow",
                                   max_shard_size="20KB", update_latest=False)
    return model, path


def test_large_weights_are_written_as_indexed_shards(tmp_path):
    state = small_dit().state_dict()
    limit = 20_000
    files = ckpt_io.save_weights(tmp_path / "ema.safetensors", state, max_shard_size="20KB")
    index = json.loads((tmp_path / "ema.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("ema-*.safetensors"))
    n = len(shards)
    assert n > 2 and files[0].name == "ema.safetensors.index.json" and len(files) == n + 1
    assert shards == [f"ema-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "ema.safetensors").exists()
    assert index["metadata"]["total_size"] == nbytes(state)
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # each shard within the limit unless it holds one bigger tensor alone
        part = ckpt_io.load_weights(tmp_path / shard)
        assert nbytes(part) <= limit or len(part) == 1
    loaded = ckpt_io.load_weights(tmp_path / "ema.safetensors")  # the one-file name reads the shards
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_small_weights_stay_one_file_and_a_rewrite_leaves_no_stale_form(tmp_path):
    state = small_dit().state_dict()
    ckpt_io.save_weights(tmp_path / "model.safetensors", state, max_shard_size="20KB")
    ckpt_io.save_weights(tmp_path / "model.safetensors", state)  # default 10GB: one file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    ckpt_io.save_weights(tmp_path / "model.safetensors", state, max_shard_size=30_000)
    assert not (tmp_path / "model.safetensors").exists()
    assert all(re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", p.name)
               for p in tmp_path.iterdir())


def test_sharded_checkpoint_loads_transparently_with_every_shard_hashed(sharded):
    model, path = sharded
    files = sorted(p.name for p in path.iterdir())
    assert "ema.safetensors" not in files and "ema.safetensors.index.json" in files
    recorded = ckpt_io.load_config(path)["checkpoint"]["weights_sha256"]
    on_disk = [p for p in path.iterdir() if p.name.endswith((".safetensors", ".index.json"))]
    assert set(recorded) == {p.name for p in on_disk}
    assert all(recorded[p.name] == ckpt_io.file_sha256(p) for p in on_disk)
    for use_ema in (True, False):
        loaded = difftools.load(path, use_ema=use_ema)
        torch.testing.assert_close(outputs(loaded.model), outputs(model), rtol=0, atol=0)


def test_a_changed_shard_is_caught_by_its_own_hash(sharded):
    _, path = sharded
    shard = sorted(path.glob("ema-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # last float of the shard -> 1.0
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"corrupt weights file .*{shard.name}: its sha256 is"):
        difftools.load(path)
    difftools.load(path, verify=False)  # edited on purpose: loads


def test_a_missing_shard_is_named(sharded):
    _, path = sharded
    shard = sorted(path.glob("ema-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"incomplete checkpoint .*: missing {shard.name} \(a shard"):
        difftools.load(path)
    with pytest.raises(CheckpointError, match=rf"incomplete sharded weights .*{shard.name} is missing"):
        difftools.load(path, verify=False)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", ".hidden.safetensors", "x.bin"])
def test_an_index_cannot_point_outside_its_folder(sharded, target):
    _, path = sharded
    index = path / "ema.safetensors.index.json"
    data = json.loads(index.read_text())
    key = sorted(data["weight_map"])[0]
    data["weight_map"][key] = target
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(key)}' maps to '{re.escape(target)}', "
                                              r"which is not a \*.safetensors file name in the same folder"):
        difftools.load(path, verify=False)


def test_an_index_that_disagrees_with_its_shards_is_refused(sharded):
    _, path = sharded
    index = path / "ema.safetensors.index.json"
    data = json.loads(index.read_text())
    first, second = sorted(set(data["weight_map"].values()))[:2]
    key = next(k for k, v in data["weight_map"].items() if v == first)
    data["weight_map"][key] = second
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"corrupt sharded weights .*index.json: shard {second} lacks "
                                              rf"\['{re.escape(key)}'\], which the index assigns to it"):
        difftools.load(path, verify=False)


def test_environment_sets_the_threshold_for_every_writer(tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt_io.SHARD_SIZE_ENV, "25KB")
    path = ckpt_io.save_checkpoint(tmp_path / "c", small_dit(), process=Flow(), prediction="flow")
    assert all((path / f"{name}.safetensors.index.json").is_file() for name in ("model", "ema"))
    assert ckpt_io.max_shard_bytes() == 25_000 and ckpt_io.max_shard_bytes("1GiB") == 2**30


@pytest.mark.parametrize("size,expected", [("10GB", 10 * 10**9), ("500 MB", 5 * 10**8),
                                           ("2GiB", 2 * 2**30), ("1.5kb", 1500), (4096, 4096), ("123", 123)])
def test_parse_size(size, expected):
    assert ckpt_io.parse_size(size) == expected


@pytest.mark.parametrize("size", ["ten GB", "0", -5, "infGB", "5 parsecs"])
def test_parse_size_refuses_nonsense(size):
    with pytest.raises(ValueError, match="max_shard_size must be a positive size"):
        ckpt_io.parse_size(size)


def test_weights_sha256_identifies_single_and_sharded_weights(sharded, tmp_path):
    model, path = sharded
    single = ckpt_io.save_checkpoint(tmp_path / "single", model, process=Flow(), prediction="flow")
    assert ckpt_io.weights_sha256(single) == ckpt_io.file_sha256(single / "ema.safetensors")
    before = ckpt_io.weights_sha256(path)
    shard = sorted(path.glob("ema-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    assert ckpt_io.weights_sha256(path) != before
