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
    assert meta["test_accuracy"] == pytest.approx(rec["test_accuracy"]) and rec["test_accuracy"] > 0.5
    assert model.config()["widths"] == list(preset("digits")["widths"])
