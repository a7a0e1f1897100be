"""The metric classifier: accuracy on the digits test split within the CPU budget; checkpoint round trip;
noise-conditional variant; Hydra recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difftools.data import build_dataset
from difftools.metrics.classifier import (
    accuracy,
    dataset_tensors,
    fit_classifier,
    fit_options,
    preset,
    save_classifier,
)
from difftools.metrics.features import load_classifier
from difftools.models.classifier import Classifier
from difftools.process import Flow

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_accuracy_within_budget_and_checkpoint_roundtrip(tmp_path):
    """Stated: >= 95 % on the 360 digits test images, trained in < 30 s on one CPU thread."""
    train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    p = preset("digits")
    torch.manual_seed(0)
    model = Classifier(1, 16, 10, p["widths"], p["depth"], name="clf_test")
    t0 = time.perf_counter()
    res = fit_classifier(model, train, test, **fit_options(p), device="cpu", log=None)
    assert time.perf_counter() - t0 < 30
    assert res.test_accuracy >= 0.95
    save_classifier(tmp_path / "clf", model, test.info, res, config={"data": {"name": "digits"}})
    loaded, meta = load_classifier(tmp_path / "clf")
    x, y = dataset_tensors(test)
    assert accuracy(loaded, x, y) == pytest.approx(res.test_accuracy)
    assert meta["name"] == "clf_test" and meta["test_accuracy"] == pytest.approx(res.test_accuracy)
    assert len(meta["weights_sha256"]) == 64
    with torch.no_grad():
        f = loaded.features(x[:5].float() / 127.5 - 1)
    assert f.shape == (5, 64)


def test_noise_conditional_classifier_uses_t_and_guidance_gradient():
    train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    torch.manual_seed(0)
    model = Classifier(1, 16, 10, (16, 32, 64), 1, noise_conditional=True, time_dim=32)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():  # FiLM starts at zero: t has no effect before training
        assert torch.equal(model.eval()(x, torch.zeros(4)), model(x, torch.ones(4)))
    fit_classifier(
        model, train, None, epochs=8, batch_size=64, lr=0.1, shift=1, process=Flow(), device="cpu", log=None
    )
    xt, yt = dataset_tensors(test)
    clean = accuracy(model, xt, yt, t=0.0)
    assert clean >= 0.85
    # at t = 0.95 (flow: 5 % signal) the classifier can hardly tell; accuracy must drop
    g = torch.Generator().manual_seed(0)
    x0 = xt.float() / 127.5 - 1
    noisy = Flow().marginal(x0, torch.randn(x0.shape, generator=g), 0.95).float()
    with torch.no_grad():
        acc_noisy = (model(noisy, torch.full((len(x0),), 0.95)).argmax(-1) == yt).float().mean().item()
    assert acc_noisy < clean - 0.2
    grad = model.log_prob_grad(x0[:3], torch.zeros(3), yt[:3])
    assert grad.shape == x0[:3].shape and grad.abs().sum() > 0


def test_hydra_recipe_trains_and_saves(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train" / "classifier.py"),
            "train.epochs=2",
            f"hydra.run.dir={tmp_path}",
            "name=clf_cli",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["name"] == "clf_cli" and rec["checkpoint"] == str(tmp_path / "classifier")
    model, meta = load_classifier(rec["checkpoint"])
    assert meta["test_accuracy"] == pytest.approx(rec["test_accuracy"]) and rec["test_accuracy"] > 0.3
    assert model.config()["widths"] == list(preset("digits")["widths"])


# ------------------------------------------------------------------------------------ on the training engine
def former_fit(model, x_train, y_train, epochs, batch_size, lr, flip, shift, process, seed=0):
    """fit_classifier's own loop before it moved onto the engine (commit 4e56b01), CPU path, with its
    default weight decay 5e-4, momentum 0.9, label smoothing 0.1 and warm-up fraction 0.15."""
    import torch.nn.functional as F

    from difftools.data.augment import random_shift

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 5e-4},
                           {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0}],
                          lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = max(len(x_train) // batch_size, 1)
    total = epochs * steps_per_epoch
    n_warm = max(int(0.15 * total), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / n_warm if s < n_warm else max(total - s, 0) / max(total - n_warm, 1))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = x_train[idx].float() / 127.5 - 1
            if flip:
                mask = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(mask[:, None, None, None], x.flip(-1), x)
            x = random_shift(x, shift, gen)
            t = None
            if process is not None:
                t = torch.rand(len(idx), generator=gen)
                x = process.marginal(x, torch.randn(x.shape, generator=gen), t).float()
            loss = F.cross_entropy(model(x, t).float(), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def small_noise_conditional():
    torch.manual_seed(0)
    return Classifier(1, 16, 10, (8, 16), 1, noise_conditional=True, time_dim=16)


def test_engine_recipe_reproduces_the_former_loop(monkeypatch):
    """Same draws in the same order (permutation, flips, shifts, t, eps), same optimizer and schedule:
    with the unfused SGD of the former loop the weights match it bit for bit; the engine's fused SGD
    only rounds differently."""
    import difftools.training.trainer as engine
    from difftools.training.optim import hyperparameters, param_groups

    half = build_dataset("digits", subset="half0")  # 718 images: 11 steps of 64 per epoch
    x, y = dataset_tensors(half)
    opts = dict(epochs=2, batch_size=64, lr=0.1, flip=True, shift=1, process=Flow())
    reference = small_noise_conditional()
    former_fit(reference, x, y, **opts)
    fused = small_noise_conditional()
    fit_classifier(fused, half, None, device="cpu", log=None, **opts)
    monkeypatch.setattr(engine, "build_optimizer", lambda named, cfg, device: (
        torch.optim.SGD(param_groups(list(named), cfg), **hyperparameters(cfg)), False))
    unfused = small_noise_conditional()
    fit_classifier(unfused, half, None, device="cpu", log=None, **opts)
    ref = reference.state_dict()
    assert all(torch.equal(unfused.state_dict()[k], ref[k]) for k in ref)
    drift = max((fused.state_dict()[k].float() - ref[k].float()).abs().max().item() for k in ref)
    assert 0 < drift < 1e-4, drift


def test_fit_resumes_mid_epoch_exactly_and_refuses_other_data(tmp_path):
    from difftools.checkpoint import CheckpointError

    half = build_dataset("digits", subset="half0")
    opts = dict(epochs=2, batch_size=64, lr=0.1, flip=True, shift=1, process=Flow(), device="cpu", log=None)
    lines = []
    full = small_noise_conditional()
    fit_classifier(full, half, None, run_dir=tmp_path / "a", ckpt_every=15, **dict(opts, log=lines.append))
    assert [line.split()[:2] for line in lines] == [["epoch", "1/2"], ["epoch", "2/2"]]
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000015", "step_0000022"]
    # step 15 is batch 4 of the second epoch: the permutation and the generator come from the checkpoint
    resumed = small_noise_conditional()
    fit_classifier(resumed, half, None, run_dir=tmp_path / "b",
                   resume=str(tmp_path / "a" / "checkpoints" / "step_0000015"), **opts)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in full.state_dict().items())
    loaded, meta = load_classifier(tmp_path / "a" / "checkpoints" / "step_0000022")
    assert meta["process"] is not None and all(
        torch.equal(loaded.state_dict()[k], v) for k, v in full.state_dict().items())
    with pytest.raises(CheckpointError, match="permutation covers 718 images, this run has 1437"):
        fit_classifier(small_noise_conditional(), build_dataset("digits"), None, run_dir=tmp_path / "c",
                       resume=str(tmp_path / "a" / "checkpoints" / "step_0000015"), **opts)


def test_fit_keeps_out_of_accelerates_process_state(monkeypatch):
    """accelerate holds one state per process: after a run made a bf16 Accelerator (a DiT run), another
    with other settings is refused, and under ``accelerate launch`` it would span every rank. So
    fit_classifier (called e.g. by rank 0's final evaluation) must never build one."""
    import accelerate

    import difftools.training.trainer as engine

    def refuse(*args, **kwargs):
        raise AssertionError("fit_classifier built an accelerate Accelerator")

    monkeypatch.setattr(accelerate.Accelerator, "__init__", refuse)
    monkeypatch.setattr(engine, "make_accelerator", refuse)
    ds = build_dataset("digits")
    res = fit_classifier(Classifier(1, 16, 10, (8, 16), 1), ds, ds, epochs=3, batch_size=64, lr=0.05,
                         device="cpu", log=None)
    assert res.test_accuracy > 0.3


def test_hydra_recipe_on_one_half_with_checkpoints(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(REPO / "train" / "classifier.py"), "train.epochs=4", "data.subset=half1",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    # trained on 719 images (4 epochs of 11 steps of 64; the whole split would take 88), scored on the
    # whole test split
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000044"]
    model, meta = load_classifier(rec["checkpoint"])
    assert meta["test_accuracy"] == pytest.approx(rec["test_accuracy"]) and rec["test_accuracy"] > 0.3
    assert accuracy(model, *dataset_tensors(build_dataset("digits", split="test"))) == rec["test_accuracy"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 44 and "accuracy" in records[-1]
