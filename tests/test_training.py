"""Trainer, EMA, data order, denoising loss and the Hydra CLI (all on CPU, tiny models)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import difftools
from difftools import checkpoint as ckpt_io
from difftools.data import build_dataset
from difftools.data.base import ArrayDataset
from difftools.losses import DenoisingLoss, build_loss
from difftools.models.dit import DiT
from difftools.process import EDM, VP, Flow
from difftools.training import EMA, DenoisingObjective, NonFiniteLossError, Trainer, TrainerConfig
from difftools.training.optim import lr_lambda
from difftools.training.state import BatchPlan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(isolated_engine):
    """Every test of this file runs isolated (tests/conftest.py)."""


def tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT(input_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2,
               num_classes=10)


def small_digits(n: int = 96, flip: bool = True) -> ArrayDataset:
    """A slice of digits (small, so that 8 steps of batch 32 cross an epoch boundary)."""
    full = build_dataset("digits", image_size=16)
    return ArrayDataset(full.images[:n].clone(), full.labels[:n].clone(), full.info, random_flip=flip)


def make_trainer(out, dataset=None, loss=None, model=None, **kw) -> Trainer:
    opts = dict(batch_size=32, max_steps=8, lr=1e-3, warmup_steps=2, log_every=2, ckpt_every=4, keep_last=0,
                sample_every=0, sample_num=10, sample_steps=2, progress=False, tensorboard=False,
                ema_decay=0.9, device="cpu", sample_cfg_scale=1.0)
    opts.update(kw)
    process = Flow()
    model = model if model is not None else tiny_dit()
    loss = loss if loss is not None else DenoisingLoss(process, "flow", "logit_normal")
    dataset = dataset if dataset is not None else small_digits()
    cfg = TrainerConfig(**opts)
    objective = DenoisingObjective(model, loss, process, "flow", dataset_info=dataset.info)
    return Trainer(objective, cfg, out, dataset=dataset, run_config={"note": "test"})


# ---------------------------------------------------------------------------------- loss
def test_denoising_loss_is_zero_for_the_oracle_and_builds_x_t():
    """x_t = alpha x0 + sigma eps: a model that inverts it with the true x0 gives the exact target."""
    x0 = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    for process, prediction in [(Flow(), "flow"), (VP(), "eps"), (VP("cosine"), "v"), (EDM(), "x0")]:
        def oracle(x_t, t, y, process=process, prediction=prediction):
            a = process.alpha(t).view(-1, 1, 1, 1)
            s = process.sigma(t).view(-1, 1, 1, 1)
            eps = (x_t - a * x0) / s
            return process.target(x0, eps, t, prediction)

        loss_fn = DenoisingLoss(process, prediction, "uniform", t_min=0.05, t_max=0.95)
        loss, logs = loss_fn(oracle, x0, None, generator=torch.Generator().manual_seed(0))
        assert loss.item() < 1e-12, (process, prediction, loss.item())
        zero_loss, _ = loss_fn(lambda x_t, t, y: torch.zeros_like(x_t), x0, None,
                               generator=torch.Generator().manual_seed(0))
        assert zero_loss.item() > 0.1


def test_denoising_loss_value_matches_hand_computation():
    process, x0 = VP(), torch.randn(8, 1, 4, 4)
    loss_fn = DenoisingLoss(process, "eps", "uniform")
    g = torch.Generator().manual_seed(3)
    loss, _ = loss_fn(lambda x_t, t, y: 0.5 * x_t, x0, None, generator=g)
    g = torch.Generator().manual_seed(3)
    t = 1e-5 + (1.0 - 1e-5) * torch.rand(8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = process.alpha(t).view(-1, 1, 1, 1) * x0 + process.sigma(t).view(-1, 1, 1, 1) * eps
    assert loss.item() == pytest.approx((0.5 * x_t - eps).pow(2).mean().item(), rel=1e-6)


def test_loss_weightings():
    t = torch.tensor([0.1, 0.5, 0.9])
    vp = VP()
    snr = (vp.alpha(t.double()) / vp.sigma(t.double())) ** 2
    w = DenoisingLoss(vp, "eps", weighting="min_snr", min_snr_gamma=5.0).weight(t)
    torch.testing.assert_close(w.double(), snr.clamp(max=5.0) / snr, rtol=1e-6, atol=0)
    w_v = DenoisingLoss(vp, "v", weighting="min_snr").weight(t)
    torch.testing.assert_close(w_v.double(), snr.clamp(max=5.0) / (snr + 1), rtol=1e-6, atol=0)
    edm = EDM()
    s = edm.sigma(t.double())
    w_edm = DenoisingLoss(edm, "x0", weighting="edm").weight(t)
    torch.testing.assert_close(w_edm.double(), (s**2 + 0.25) / (s * 0.5) ** 2, rtol=1e-6, atol=0)
    assert torch.equal(DenoisingLoss(Flow(), "flow").weight(t), torch.ones(3))
    with pytest.raises(ValueError, match="weighting"):
        DenoisingLoss(Flow(), "flow", weighting="p2")
    with pytest.raises(ValueError, match="unknown loss option"):
        build_loss({"prediction": "flow", "bogus": 1}, tiny_dit(), Flow())


def test_flow_prediction_weighting_uses_the_velocity_to_x0_scale():
    """For Flow (alpha = 1 - t, sigma = t), x0 = x_t - t v, so the velocity error is the x0 error over
    t: c_flow^2 = 1 / t^2, and min_snr (W = min(SNR, 5), SNR = ((1 - t) / t)^2) weights the velocity
    MSE by min(SNR, 5) t^2."""
    t = torch.tensor([0.1, 0.5, 0.9])
    expected = torch.tensor([5.0 * 0.1**2, 1.0 * 0.5**2, (1 / 81) * 0.9**2])  # SNR = 81, 1, 1/81
    torch.testing.assert_close(DenoisingLoss(Flow(), "flow", weighting="min_snr").weight(t), expected)
    # VP with a flow (dx_t/dt) prediction: c_flow = (alpha sigma' - sigma alpha') / sigma, with the
    # derivatives taken here by central differences of alpha and sigma
    h = 1e-6
    t64 = t.double()
    for process in (VP(), VP("cosine")):
        a, s = process.alpha(t64), process.sigma(t64)
        da = (process.alpha(t64 + h) - process.alpha(t64 - h)) / (2 * h)
        ds = (process.sigma(t64 + h) - process.sigma(t64 - h)) / (2 * h)
        c_sq = ((a * ds - s * da) / s) ** 2
        w = DenoisingLoss(process, "flow", weighting="min_snr").weight(t)
        torch.testing.assert_close(w.double(), ((a / s) ** 2).clamp(max=5.0) / c_sq, rtol=1e-5, atol=0)


def test_weighted_loss_is_the_mean_of_w_t_times_the_per_sample_mse():
    process, x0 = VP(), torch.randn(8, 1, 4, 4)
    loss_fn = DenoisingLoss(process, "eps", "uniform", weighting="min_snr", min_snr_gamma=5.0)
    loss, logs = loss_fn(lambda x_t, t, y: 0.5 * x_t, x0, None, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, by hand
    t = 1e-5 + (1.0 - 1e-5) * torch.rand(8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a, s = process.alpha(t).view(-1, 1, 1, 1), process.sigma(t).view(-1, 1, 1, 1)
    mse = (0.5 * (a * x0 + s * eps) - eps).pow(2).flatten(1).mean(1)
    snr = (process.alpha(t.double()) / process.sigma(t.double())) ** 2
    w = snr.clamp(max=5.0) / snr  # min_snr for eps: min(SNR, 5) / SNR
    assert loss.item() == pytest.approx((w * mse.double()).mean().item(), rel=1e-5)
    assert abs(loss.item() - mse.mean().item()) > 0.05 * mse.mean().item()  # the weights matter here
    assert logs["loss_mse"].item() == pytest.approx(mse.mean().item(), rel=1e-6)  # logged unweighted


# ---------------------------------------------------------------------------------- pieces
def test_ema_decay_schedule_and_update():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.99, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1000) == pytest.approx(0.99)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.1 * 1 + 0.9 * 3
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 2.8))
    ema.update(model)  # d_1 = 2/11
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 2 / 11 * 2.8 + 9 / 11 * 3.0))
    assert EMA(model, 0.5, warmup=False).decay_at(0) == 0.5


def test_ema_copies_integer_buffers_and_averages_float_buffers():
    """BatchNorm's num_batches_tracked (int64) is copied from the model; running_mean is averaged."""
    bn = nn.BatchNorm1d(2, momentum=1.0)  # momentum 1: running_mean = the last batch's mean
    ema = EMA(bn, decay=0.5, warmup=False)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    for _ in range(3):
        bn(x)
    ema.update(bn)
    count = ema.shadow["num_batches_tracked"]
    assert count.dtype == torch.int64 and count.item() == 3
    torch.testing.assert_close(ema.shadow["running_mean"], torch.tensor([1.0, 2.0]))  # 0.5 * 0 + 0.5 * [2, 4]


def test_lr_warmup_and_cosine():
    cfg = TrainerConfig(lr=1.0, warmup_steps=4, max_steps=14, lr_decay="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)


def test_batch_plan_splits_global_batch_over_ranks():
    single = BatchPlan(100, 32, 0, 1, seed=5)
    ranks = [BatchPlan(100, 32, r, 4, seed=5) for r in range(4)]
    assert ranks[0].per_device == 8 and single.batches_per_epoch == 3
    for k in range(7):  # crosses two epoch boundaries
        assert sum((p.indices(k) for p in ranks), []) == single.indices(k)
    epoch0 = sum((single.indices(k) for k in range(3)), [])
    assert len(set(epoch0)) == 96  # no item twice within an epoch
    assert single.indices(3) != single.indices(0)  # a fresh permutation per epoch
    with pytest.raises(ValueError, match="not divisible"):
        BatchPlan(100, 30, 0, 4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan(10, 32)


# ---------------------------------------------------------------------------------- trainer
def test_loss_decreases_on_digits(tmp_path):
    ds = build_dataset("digits", image_size=16)
    tr = make_trainer(tmp_path, dataset=ds, max_steps=120, lr=3e-3, warmup_steps=10, log_every=20,
                      ckpt_every=0, batch_size=32)
    result = tr.train()
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-20:]) / 20
    assert len(result.losses) == 120
    assert last < 0.75 * first, (first, last)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(20, 121, 20))
    assert all(r["img_per_s"] > 0 and r["tflops"] > 0 and "grad_norm" in r for r in lines)


def test_resume_reproduces_losses_bit_exactly(tmp_path):
    straight = make_trainer(tmp_path / "a").train()
    first = make_trainer(tmp_path / "b", max_steps=4).train()
    resumed_trainer = make_trainer(tmp_path / "c", resume=str(tmp_path / "b" / "checkpoints"))
    resumed = resumed_trainer.train()
    assert len(straight.losses) == 8 and len(resumed.losses) == 4
    assert first.losses + resumed.losses == straight.losses  # exact float equality
    a = ckpt_io.load_weights(tmp_path / "a" / "checkpoints" / "step_0000008" / "ema.safetensors")
    c = ckpt_io.load_weights(tmp_path / "c" / "checkpoints" / "step_0000008" / "ema.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # a different seed gives different losses, so the equality above is not vacuous
    other = make_trainer(tmp_path / "d", max_steps=4, seed=1).train()
    assert other.losses != first.losses


class _NaNAfter(nn.Module):
    """Denoising loss that turns NaN from call ``bad_call`` on (a simulated divergence)."""

    def __init__(self, bad_call: int):
        super().__init__()
        self.inner, self.calls, self.bad_call = DenoisingLoss(Flow(), "flow"), 0, bad_call

    def forward(self, model, x0, y, generator=None):
        self.calls += 1
        loss, logs = self.inner(model, x0, y, generator)
        return (loss * float("nan") if self.calls >= self.bad_call else loss), logs


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    tr = make_trainer(tmp_path, loss=_NaNAfter(bad_call=7), log_every=4, ckpt_every=4)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 7.*step_0000004"):
        tr.train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_0000004"]
    assert ckpt_io.read_latest(root).name == "step_0000004"
    loaded = difftools.load(tmp_path)
    assert loaded.step == 4
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    events = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nonfinite_loss" and events[-1]["step"] == 7


def test_checkpoint_layout_load_and_sample_grid(tmp_path):
    tr = make_trainer(tmp_path, max_steps=4, sample_every=4)
    result = tr.train()
    ckpt = tmp_path / "checkpoints" / "step_0000004"
    assert result.checkpoint == ckpt and ckpt_io.read_latest(tmp_path / "checkpoints") == ckpt
    for f in ["model.safetensors", "ema.safetensors", "config.yaml", "state/optimizer.pt",
              "state/scheduler.pt", "state/rng_0.pt", "state/trainer.json"]:
        assert (ckpt / f).is_file(), f
    state = json.loads((ckpt / "state" / "trainer.json").read_text())
    assert state["step"] == 4 and state["epoch"] == 1 and state["batch_in_epoch"] == 1
    loaded = difftools.load(ckpt)
    assert loaded.prediction == "flow" and isinstance(loaded.process, Flow)
    assert loaded.dataset_info["num_classes"] == 10 and loaded.config["note"] == "test"
    x, t, y = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), tr.ema_model()(x, t, y), rtol=0, atol=0)
        raw = difftools.load(ckpt, use_ema=False).model
        torch.testing.assert_close(raw(x, t, y), tr.model.eval()(x, t, y), rtol=0, atol=0)
    from PIL import Image

    img = Image.open(result.grid)
    assert img.size == (10 * 18 + 2, 1 * 18 + 2)  # 10 samples in one row of 16px + 2px padding


def test_loss_module_parameters_are_trained_and_saved_but_not_exported(tmp_path):
    model = tiny_dit()
    loss = build_loss({"prediction": "flow", "align": {"weight": 1.0, "depth": 1}}, model, Flow())
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    assert before and all(k.startswith("projector.") for k in before)
    make_trainer(tmp_path, model=model, loss=loss, max_steps=4).train()
    ckpt = tmp_path / "checkpoints" / "step_0000004"
    saved = ckpt_io.load_weights(ckpt / "state" / "objective.safetensors")
    saved = {k.removeprefix("loss_fn."): v for k, v in saved.items()}  # the loss is objective.loss_fn
    assert set(saved) == set(before)
    assert any(not torch.equal(saved[k], before[k]) for k in before), "projector was not trained"
    for f in ("model.safetensors", "ema.safetensors"):
        assert not any("projector" in k for k in ckpt_io.load_weights(ckpt / f)), f
    assert isinstance(difftools.load(ckpt).model, DiT)


def test_per_device_batch_is_logged_from_global_batch(tmp_path, caplog):
    with caplog.at_level("INFO", logger="difftools.train"):
        make_trainer(tmp_path, max_steps=2, ckpt_every=0).train()
    assert "global batch 32 = 1 devices x 32" in caplog.text


# ---------------------------------------------------------------------------------- Hydra CLI
def _train_module():
    spec = importlib.util.spec_from_file_location("train_dit", REPO / "train" / "dit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("dit", overrides=overrides)


def test_config_groups_compose_and_wrong_keys_fail():
    cfg = _compose(["model=dit_s2", "data=cifar10", "process=vp", "trainer.batch_size=256"])
    assert cfg.model._args_ == ["DiT-S/2"] and cfg.data.name == "cifar10" and cfg.trainer.batch_size == 256
    assert cfg.loss.prediction == "eps" and cfg.process.schedule == "linear"
    edm = _compose(["process=edm"])
    assert edm.loss.prediction == "x0" and edm.loss.weighting == "edm"
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.bogus"):
        _compose(["trainer.bogus=1"])
    with pytest.raises(ConfigCompositionException):
        _compose(["model=dit_nonexistent"])


def test_missing_data_gives_clear_error(tmp_path):
    cfg = _compose(["data=mnist", f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _train_module().build_run(cfg)


def test_build_run_instantiates_everything():
    dataset, ae, model, process, loss = _train_module().build_run(_compose([]))
    assert isinstance(model, DiT) and model.input_size == 16 and model.in_channels == 1
    assert model.num_classes == 10 and isinstance(process, Flow) and loss.prediction == "flow"
    assert ae.name == "identity" and len(dataset) > 1000


def test_cli_trains_and_writes_run_directory(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(REPO / "train" / "dit.py"), f"hydra.run.dir={tmp_path}", "trainer.max_steps=3",
           "trainer.batch_size=16", "trainer.sample_num=10", "trainer.sample_steps=2", "trainer.log_every=1",
           "trainer.progress=false", "model.hidden_size=32", "model.depth=1", "trainer.cpu_threads=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "step_0000003"
    assert (ckpt / "model.safetensors").is_file() and (tmp_path / "samples" / "step_0000003.png").is_file()
    assert any((tmp_path / "tb").iterdir()) and (tmp_path / ".hydra" / "config.yaml").is_file()
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    loaded = difftools.load(tmp_path)
    assert loaded.config["trainer"]["max_steps"] == 3 and loaded.autoencoder.name == "identity"
    bad = subprocess.run(cmd + ["trainer.typo_key=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "typo_key" in bad.stderr


@pytest.mark.cuda
def test_cuda_bf16_training_and_cpu_load(tmp_path):
    tr = make_trainer(tmp_path, max_steps=4, device="auto", sample_every=4, sample_cfg_scale=2.0)
    result = tr.train()
    assert tr.device.type == "cuda" and tr.acc.mixed_precision == "bf16"
    assert all(math.isfinite(v) for v in result.losses) and result.grid.is_file()
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 0 < records[-1]["mfu"] < 1
    loaded = difftools.load(tmp_path, device="cpu")  # weights saved from CUDA load on CPU
    assert next(loaded.model.parameters()).device.type == "cpu"
