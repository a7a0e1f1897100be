"""scripts/sample.py on a tiny trained DiT: promised files, determinism, batch/shard independence, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("sample_script", REPO / "scripts" / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 2-block DiT trained 60 steps on digits (flow matching), saved as a real checkpoint."""
    from difftools.checkpoint import save_checkpoint
    from difftools.data import build_dataset
    from difftools.losses import DenoisingLoss
    from difftools.process import Flow
    from difftools.testing import tiny_dit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = build_dataset("digits", split="train")
    model = tiny_dit(16, 1, 10).train()
    loss_fn = DenoisingLoss(Flow(), prediction="flow")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
    it = iter(loader)
    for _ in range(60):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        loss, _ = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "step_000060"
    save_checkpoint(
        path,
        model,
        config={"data": {"name": "digits", "image_size": 16}},
        process=Flow(),
        prediction="flow",
        dataset_info=ds.info,
        step=60,
    )
    return path


def make_cfg(**over):
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.pop("hydra")
    cfg.merge_with(OmegaConf.create({"progress": False, "precision": "fp32", **over}))
    return cfg


def test_cli_writes_exactly_the_promised_files(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "DIFFTOOLS_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "sample.py"),
            f"ckpt={tiny_ckpt.parent.parent}",
            "sampler=dpmpp_2m",
            "steps=4",
            "guidance.scale=1.5",
            "num_samples=20",
            "seed=3",
            "batch_size=8",
            f"out={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "metrics.json", "samples.npz"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(20)]
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (20, 16, 16, 1) and z["images"].dtype == np.uint8
        np.testing.assert_array_equal(z["labels"], np.arange(20) % 10)
    rec = json.loads((out / "metrics.json").read_text())
    name = "fd_clf_digits16"
    assert rec["metrics"][name]["n_samples"] == 20 and rec["metrics"][name]["n_reference"] == 1437
    assert rec[name] > 0 and 0.0 <= rec["class_accuracy"] <= 1.0
    # guided dpmpp_2m, 4 steps + the final denoising: 5 batched (cond+uncond) evaluations
    assert (
        rec["nfe"] == 5
        and rec["sampler"]["guidance_scale"] == 1.5
        and rec["sampler"]["sampler"] == "dpmpp_2m"
    )
    assert rec["images_per_second"] > 0 and rec["sampling_seconds"] > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["num_samples"] == 20


def test_same_seed_same_images_independent_of_batch_and_shards(tiny_ckpt, tmp_path):
    mod = load_script()
    from difftools.checkpoint import load
    from difftools.generate import generate_uint8

    outs = {}
    for name, over in {
        "a": dict(batch_size=8),
        "b": dict(batch_size=8),
        "c": dict(batch_size=3),
        "d": dict(batch_size=8, seed=1),
    }.items():
        cfg = make_cfg(
            ckpt=str(tiny_ckpt),
            steps=3,
            num_samples=12,
            seed=over.pop("seed", 0),
            save={"png": False, "grid": False},
            metrics={"enabled": False},
            **over,
        )
        (tmp_path / name).mkdir()
        mod.run(cfg, tmp_path / name)
        outs[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["metrics.json", "samples.npz"]
    np.testing.assert_array_equal(outs["a"], outs["b"])  # same seed: same images
    diff = np.abs(outs["a"].astype(int) - outs["c"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # batch size changes only float round-off
    assert np.abs(outs["a"].astype(int) - outs["d"].astype(int)).mean() > 5  # another seed: other images
    # two "GPUs": strided shards drawn separately and merged equal the single-process samples
    loaded = load(tiny_ckpt)
    spec = mod.build_spec(make_cfg(ckpt=str(tiny_ckpt), steps=3, seed=0))
    shards = [mod.shard_indices(12, r, 2) for r in range(2)]
    parts = [generate_uint8(loaded, idx, spec, 4, "cpu")[0] for idx in shards]
    merged = torch.empty(12, 1, 16, 16, dtype=torch.uint8)
    for idx, imgs in zip(shards, parts, strict=False):
        merged[idx] = imgs
    diff = np.abs(merged.permute(0, 2, 3, 1).numpy().astype(int) - outs["a"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(ckpt="/nonexistent/run"), "checkpoint not found"),
        (dict(sampler="nope"), "unknown sampler 'nope'"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(steps="abc"), "steps='abc' is a str; expected an integer"),
        (dict(guidance={"scale": "strong"}), "guidance.scale='strong' is a str; expected a number"),
    ],
)
def test_clear_errors(tiny_ckpt, tmp_path, over, message):
    mod = load_script()
    cfg = make_cfg(**{"ckpt": str(tiny_ckpt), **over})
    with pytest.raises(Exception, match=message):
        mod.run(cfg, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def _overwrite_tensor_bytes(path: Path, byte: int) -> None:
    """Keep the safetensors header intact, overwrite every tensor byte (a silent disk/copy error)."""
    data = path.read_bytes()
    body = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:body] + bytes([byte]) * (len(data) - body))


def test_cli_refuses_corrupt_weights_with_exit_code_2(tiny_ckpt, tmp_path):
    import shutil

    ckpt = tmp_path / "step_000060"
    shutil.copytree(tiny_ckpt, ckpt)
    _overwrite_tensor_bytes(ckpt / "ema.safetensors", 0)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sample.py"), f"ckpt={ckpt}", "num_samples=4", "steps=2",
         f"out={out}", f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false", "metrics.enabled=false"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: corrupt weights file {ckpt}/ema.safetensors: its sha256 is" in proc.stderr
    assert "verify_weights=false" in proc.stderr
    assert not any(out.iterdir())  # no (black) images written


def test_verify_weights_false_samples_hand_edited_weights(tiny_ckpt, tmp_path):
    import shutil

    mod = load_script()
    ckpt = tmp_path / "step_000060"
    shutil.copytree(tiny_ckpt, ckpt)
    _overwrite_tensor_bytes(ckpt / "ema.safetensors", 0)  # finite: zeros
    opts = dict(ckpt=str(ckpt), steps=2, num_samples=4, save={"png": False, "grid": False},
                metrics={"enabled": False})
    from difftools.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="sha256"):
        mod.run(make_cfg(**opts), tmp_path / "a")
    (tmp_path / "b").mkdir()
    rec = mod.run(make_cfg(verify_weights=False, **opts), tmp_path / "b")
    assert rec["num_samples"] == 4 and (tmp_path / "b" / "samples.npz").is_file()


def test_checkpoint_payload_runs_no_code_in_sample_script(tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    import yaml

    from difftools.checkpoint import CheckpointError

    mod = load_script()
    ckpt = tmp_path / "step_000060"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["checkpoint"]["model_class"] = "difftools.checkpoint:os.system"
    cfg["checkpoint"]["model"] = {"command": "touch pwned.marker"}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing model_class 'difftools\.checkpoint:os\.system'"):
        mod.run(make_cfg(ckpt=str(ckpt), steps=2, num_samples=4, metrics={"enabled": False}), tmp_path)
    assert not (tmp_path / "pwned.marker").exists()
