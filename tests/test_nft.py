"""DiffusionNFT (arXiv 2509.16117): loss algebra, advantages, old-policy schedule, rewards, a toy
end-to-end run on a two-mode Gaussian mixture, and the train/nft.py recipe (checkpoints, exact resume,
errors). CPU only, tiny models."""

from __future__ import annotations

import copy
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
from difftools.process import VP, Flow
from difftools.rl import (
    BrightnessReward,
    ClassifierReward,
    NFTLoss,
    OldPolicy,
    build_reward,
    group_advantages,
    nft_loss,
    old_decay,
    optimality_weights,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(isolated_engine):
    """Every test of this file runs isolated (tests/conftest.py)."""


# ---------------------------------------------------------------------------------- loss algebra
def test_loss_value_ignores_r_at_v_old_but_gradient_is_2_2r_minus_1_times_v_old_minus_v():
    """At v_theta = v_old: L = mean ||v_old - v||^2 / beta for every r, and per element
    dL/dv_theta = 2 (2r - 1)(v_old - v) / (B D) (mean over the D elements and the B samples)."""
    g = torch.Generator().manual_seed(0)
    b, shape = 5, (3, 4, 4)
    d = math.prod(shape)
    v_old = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    v = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    values = []
    for beta in (1.0, 0.1):
        for r in (torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64),
                  torch.rand(b, generator=g, dtype=torch.float64)):
            v_theta = v_old.clone().requires_grad_(True)
            loss = nft_loss(v_theta, v_old, v, r, beta=beta).mean()
            loss.backward()
            expected = 2 * (2 * r - 1).view(-1, 1, 1, 1) * (v_old - v) / (b * d)
            assert (v_theta.grad - expected).abs().max().item() < 1e-12
            assert loss.item() == pytest.approx(((v_old - v) ** 2).mean().item() / beta, rel=1e-12)
            values.append(loss.item() * beta)
    assert max(values) - min(values) < 1e-12  # r never changes the value


def test_x0_adaptive_form_gradient_at_v_old():
    """x0 form: e = mean (x0± - x0)^2 / sg(mean |x0± - x0|), x0± = x_t - t v±. At v_theta = v_old,
    with delta = t (v - v_old): dL/dv_theta = 2 (2r - 1) t^2 (v_old - v) / (D mean|delta| B)."""
    g = torch.Generator().manual_seed(1)
    b, shape = 4, (2, 3, 3)
    d = math.prod(shape)
    x0 = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    x_t = Flow().marginal(x0, eps, t)
    v = eps - x0
    v_old = v + 0.3 * torch.randn(b, *shape, generator=g, dtype=torch.float64)
    r = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    v_theta = v_old.clone().requires_grad_(True)
    loss = nft_loss(v_theta, v_old, v, r, beta=0.5, form="x0_adaptive", x_t=x_t, t=t, x0=x0).mean()
    loss.backward()
    tb = t.view(-1, 1, 1, 1)
    w = (tb * (v - v_old)).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    expected = 2 * (2 * r - 1).view(-1, 1, 1, 1) * tb**2 * (v_old - v) / (d * w * b)
    assert (v_theta.grad - expected).abs().max().item() < 1e-12
    # value: t^2 mean(v - v_old)^2 / mean|t (v - v_old)| / beta, whatever r is
    value = ((tb * (v - v_old)) ** 2).flatten(1).mean(1) / w.flatten() / 0.5
    assert loss.item() == pytest.approx(value.mean().item(), rel=1e-12)


def test_objective_and_loss_reject_bad_settings():
    with pytest.raises(ValueError, match="rectified-flow"):
        NFTLoss(VP(), times=[1.0, 0.5])
    with pytest.raises(ValueError, match="unknown NFT loss form"):
        nft_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), form="x1")
    with pytest.raises(ValueError, match="t_per_sample"):
        NFTLoss(Flow(), times=[1.0, 0.5], t_per_sample=3)
    obj = NFTLoss(Flow(), times=[1.0, 0.5, 0.25], t_per_sample=None)
    t = obj.draw_times(4, torch.Generator().manual_seed(0), "cpu")
    # all 3 grid times, each exactly once, for each of the 4 samples
    assert sorted(t.view(4, 3)[2].tolist()) == [0.25, 0.5, 1.0] and t.numel() == 12


# ---------------------------------------------------------------------------------- advantages
def test_group_advantages_use_group_mean_and_global_std():
    rewards = torch.tensor([1.0, 10.0, 2.0, 10.0, 3.0, 10.0])
    groups = torch.tensor([7, 3, 7, 3, 7, 3])  # interleaved, arbitrary ids
    adv = group_advantages(rewards, groups)
    # global population std: mean 6, squared deviations 25 + 16 + 9 + 3 * 16 = 98 -> sqrt(98 / 6)
    std = math.sqrt(98 / 6) + 1e-4
    assert adv.tolist() == pytest.approx([-1 / std, 0, 0, 0, 1 / std, 0], abs=1e-12)
    r = optimality_weights(adv, clip=5.0)
    assert r[1].item() == 0.5 and r[3].item() == 0.5 and r[5].item() == 0.5  # identical group -> 1/2
    assert r[0].item() == pytest.approx(0.5 - 0.1 / std, abs=1e-12)  # 1/2 + 1/2 A / 5


def test_advantage_clipping_keeps_r_in_0_1():
    rewards = torch.tensor([0.0] * 99 + [100.0])  # one outlier: A = 99 / std ~ 9.95 > 5
    adv = group_advantages(rewards, torch.zeros(100, dtype=torch.long))
    assert adv[-1].item() == pytest.approx(99.0 / (math.sqrt(99.0) + 1e-4), rel=1e-9)
    r = optimality_weights(adv, clip=5.0)
    assert r[-1].item() == 1.0 and r[0].item() == pytest.approx(0.5 - 0.5 * (1 / (math.sqrt(99) + 1e-4)) / 5)
    assert 0.0 <= r.min().item() and r.max().item() <= 1.0
    assert optimality_weights(torch.tensor([-7.0, 2.5]), clip=5.0).tolist() == [0.0, 0.75]
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2))


# ---------------------------------------------------------------------------------- old policy
def test_old_policy_soft_update_and_schedule():
    assert [old_decay(k) for k in (0, 1, 10, 499, 500, 5000)] == pytest.approx(
        [0, 0.001, 0.01, 0.499, 0.5, 0.5])
    assert [old_decay(k, rate=0.0075, cap=0.999, flat=75) for k in (0, 74, 75, 175, 400)] == pytest.approx(
        [0, 0, 0, 0.75, 0.999])
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    old = OldPolicy(model)
    w_old = old.model.weight.detach().clone()
    assert not any(p.requires_grad for p in old.model.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    assert old.update(model, 100) == pytest.approx(0.1)
    assert torch.allclose(old.model.weight, 0.1 * w_old + 0.9 * model.weight.detach(), atol=1e-7)
    assert old.update(model, 0) == 0.0 and torch.equal(old.model.weight, model.weight)  # d = 0: on-policy


# ---------------------------------------------------------------------------------- rewards
def tiny_classifier(seed: int = 0):
    from difftools.models.classifier import Classifier

    torch.manual_seed(seed)
    net = Classifier(1, 16, 10, widths=(4, 8), depth=1, name="clf_tiny")
    for m in net.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
    return net.eval()


def test_classifier_reward_is_the_class_probability():
    net = tiny_classifier()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    rewards, logs = ClassifierReward(net, quantize=False).evaluate(images, labels)
    with torch.no_grad():
        probs = torch.softmax(net(images), -1)
    assert rewards.tolist() == pytest.approx(probs[torch.arange(6), labels].tolist(), rel=1e-5)
    assert logs["accuracy"] == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
    log_r = ClassifierReward(net, log_prob=True, quantize=False)(images, labels)
    assert log_r.tolist() == pytest.approx(probs[torch.arange(6), labels].log().tolist(), rel=1e-5)
    quantized = ClassifierReward(net)(images, labels)  # 8-bit rounding moves it a little, not a lot
    assert 0 < (quantized - rewards).abs().max().item() < 0.05
    with pytest.raises(ValueError, match="1-channel"):
        ClassifierReward(net)(torch.zeros(2, 3, 16, 16), labels[:2])


def test_brightness_reward_and_registry():
    images = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 0.5)])
    assert BrightnessReward()(images).tolist() == pytest.approx([0.0, -0.5, -0.75])
    assert BrightnessReward(target=0.5)(images).tolist() == pytest.approx([-0.5, 0.0, -0.25])
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        build_reward("aesthetic")
    with pytest.raises(FileNotFoundError, match="train/classifier.py"):
        build_reward("classifier", classifier="/nonexistent/clf")


# ---------------------------------------------------------------------------------- toy end to end
A, B = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 0.0])


class TinyFlow(nn.Module):
    """v(x, t) by a 2-layer MLP on (x, t)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], 1))


@pytest.fixture(scope="module")
def pretrained_toy():
    """Flow matching on 1/2 N(A, 0.4^2 I) + 1/2 N(B, 0.4^2 I) for 400 steps (~1.5 s)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model, process = TinyFlow(), Flow()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(400):
        mode = torch.randint(0, 2, (256,), generator=g)
        x0 = torch.where(mode[:, None] == 0, A, B) + 0.4 * torch.randn(256, 2, generator=g)
        eps, t = torch.randn(256, 2, generator=g), torch.rand(256, generator=g)
        loss = ((model(process.marginal(x0, eps, t), t) - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(n_threads)
    return model


def _toy_samples(model, n: int, seed: int) -> torch.Tensor:
    from samplers import ModelFn, sample

    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sample(ModelFn(lambda x, t, **c: model(x, t), Flow(), "flow"), x_T, "dpmpp_2m", 10,
                      t_end=1e-3, denoise_final=True)


def _in_a(x: torch.Tensor) -> torch.Tensor:
    return (x - A).norm(dim=1) < (x - B).norm(dim=1)


def _toy_nft(model, sign: float, form: str = "velocity", iterations: int = 8) -> float:
    """NFT iterations with reward +sign near A, -sign near B; returns the final fraction in A."""
    from samplers.schedules import get_times

    torch.manual_seed(0)
    model = copy.deepcopy(model)
    ref, old = copy.deepcopy(model).requires_grad_(False), OldPolicy(model)
    objective = NFTLoss(Flow(), beta=1.0, form=form, ref_weight=1e-4,
                        times=get_times(Flow(), "logsnr", 10, 1.0, 1e-3)[:-1], t_per_sample=2)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(1)
    for k in range(iterations):
        x0 = _toy_samples(old.model, 256, seed=k)  # collected by the old policy
        rewards = torch.where(_in_a(x0), sign, -sign)
        r = optimality_weights(group_advantages(rewards, torch.zeros(256, dtype=torch.long))).float()
        perm = torch.randperm(256, generator=gen)
        for j in range(4):
            idx = perm[64 * j:64 * (j + 1)]
            loss, _ = objective(model, old.model, x0[idx], None, r[idx], gen, ref)
            opt.zero_grad()
            loss.backward()
            opt.step()
        old.update(model, k)
    return _in_a(_toy_samples(model, 2000, seed=999)).float().mean().item()


def test_toy_nft_moves_mass_to_the_rewarded_mode(pretrained_toy):
    """Measured (seeded): 0.4935 in mode A before; after 8 iterations 0.811 rewarding A (velocity
    form), 0.854 (x0_adaptive form), and 0.206 rewarding B."""
    before = _in_a(_toy_samples(pretrained_toy, 2000, seed=999)).float().mean().item()
    assert 0.43 < before < 0.57
    assert _toy_nft(pretrained_toy, +1.0) > 0.72
    assert _toy_nft(pretrained_toy, +1.0, form="x0_adaptive") > 0.72
    assert _toy_nft(pretrained_toy, -1.0) < 0.30


# ---------------------------------------------------------------------------------- recipe
def _recipe():
    spec = importlib.util.spec_from_file_location("train_nft", REPO / "train" / "nft.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_nft"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("nft", overrides=overrides)


DIGITS_INFO = {"name": "digits", "channels": 1, "image_size": 16, "num_classes": 10,
               "class_names": [str(i) for i in range(10)]}


def make_base(path: Path, process=None, prediction: str = "flow") -> Path:
    from difftools.models.dit import DiT
    from difftools.models.vae import build_autoencoder

    torch.manual_seed(0)
    model = DiT(input_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2,
                num_classes=10)
    with torch.no_grad():  # adaLN-Zero starts at a zero output: give the tiny base a non-trivial velocity
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return ckpt_io.save_checkpoint(path / "checkpoints" / "step_0000010", model, config={"note": "tiny base"},
                                   process=process or Flow(), prediction=prediction, step=10,
                                   autoencoder=build_autoencoder("identity", channels=1),
                                   dataset_info=DIGITS_INFO)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from difftools.metrics.classifier import FitResult, save_classifier

    root = tmp_path_factory.mktemp("nft")
    base = make_base(root / "base")
    clf = save_classifier(root / "clf", tiny_classifier(), DIGITS_INFO, FitResult(0.5, 1.0, 1, 1.0))
    return root, base, clf


def _overrides(base, clf, **extra):
    opts = {"base": str(base), "reward": "classifier", "reward_opts.classifier": str(clf), "iterations": 3,
            "groups": 2, "group_size": 4, "train_batch": 4, "sampler.steps": 2, "optim.lr": 1e-3,
            "loss.t_per_sample": 1, "sample_num": 10, "sample_every": 0, "ckpt_every": 1, "keep_last": 0,
            "progress": False, "device": "cpu"}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _iterations(run_dir: Path) -> list[dict]:
    """The per-iteration records of metrics.jsonl (the engine also writes eval and event records)."""
    return [r for r in _metrics(run_dir) if "iteration" in r]


def test_recipe_writes_loadable_checkpoints_and_resumes_exactly(tiny_setup, tmp_path):
    """On the engine: one optimizer step per iteration (gradient accumulation over the 8 samples in 2
    micro-batches of 4), so checkpoints are step_<iteration>; the state is the engine's layout with
    the old policy in state/objective.safetensors; the old-policy decay is indexed by the optimizer
    step as in the released code (0.001 after the first step)."""
    root, base, clf = tiny_setup
    nft = _recipe()
    full = nft.run(_compose(_overrides(base, clf, updates_per_epoch=1)), tmp_path / "full")
    assert full.iteration == 3 and len(full.losses) == 3 and all(math.isfinite(v) for v in full.losses)
    ckpt = tmp_path / "full" / "checkpoints" / "step_0000003"
    assert ckpt_io.read_latest(tmp_path / "full" / "checkpoints") == ckpt
    state_files = {p.name for p in (ckpt / "state").iterdir()}
    assert state_files == {"objective.safetensors", "optimizer.pt", "scheduler.pt", "trainer.json",
                           "rng_0.pt"}
    meta = json.loads((ckpt / "state" / "trainer.json").read_text())
    assert meta["grad_accum"] == 2 and meta["global_batch"] == 4 and meta["step"] == 3
    loaded = difftools.load(tmp_path / "full")
    assert isinstance(loaded.process, Flow) and loaded.prediction == "flow" and loaded.step == 3
    assert loaded.dataset_info["name"] == "digits" and loaded.config["reward"] == "classifier"
    assert (tmp_path / "full" / "samples" / "step_0000000.png").is_file()
    assert (tmp_path / "full" / "samples" / "step_0000003.png").is_file()
    records = _iterations(tmp_path / "full")
    assert [r["iteration"] for r in records] == [1, 2, 3] and [r["step"] for r in records] == [1, 2, 3]
    assert all(0 <= r["reward_accuracy"] <= 1 and r["r_mean"] == pytest.approx(0.5) for r in records)
    # the model moved away from the base, and the old policy trails it (d = 0.001 k after step k)
    base_w = ckpt_io.load_weights(base / "ema.safetensors")
    model_w = ckpt_io.load_weights(ckpt / "model.safetensors")
    assert max((model_w[k] - base_w[k]).abs().max().item() for k in base_w) > 1e-4
    assert [r["old_decay"] for r in records] == pytest.approx([0.001, 0.002, 0.003])
    state = ckpt_io.load_weights(ckpt / "state" / "objective.safetensors")
    old_w = {k[len("extra/old."):]: v for k, v in state.items() if k.startswith("extra/old.")}
    assert set(old_w) == set(model_w) and not all(torch.equal(old_w[k], model_w[k]) for k in model_w)

    # killed after iteration 2 (its checkpoint is the last thing it wrote), then resumed
    part = nft.run(_compose(_overrides(base, clf, iterations=2, updates_per_epoch=1)), tmp_path / "part")
    assert part.losses == full.losses[:2]
    resumed = nft.run(_compose(_overrides(base, clf, resume="auto", updates_per_epoch=1)), tmp_path / "part")
    assert resumed.losses == full.losses[2:]  # bit-exact on CPU
    resumed_w = ckpt_io.load_weights(tmp_path / "part" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert all(torch.equal(resumed_w[k], model_w[k]) for k in model_w)
    with pytest.raises(ckpt_io.CheckpointError, match="group_size=4"):
        nft.run(_compose(_overrides(base, clf, group_size=2, resume="auto", iterations=4,
                                    updates_per_epoch=1)), tmp_path / "part")


def test_resume_in_the_middle_of_an_iteration_recollects_it_exactly(tiny_setup, tmp_path):
    """With one optimizer step per micro-batch (2 per iteration), a run stopped after step 3 -- half-way
    through iteration 2 -- and resumed re-collects iteration 2 from (seed, k, rank) and the old policy in
    its checkpoint, skips the micro-batch already trained on, and ends on the uninterrupted run's weights."""
    import dataclasses

    from difftools.training import Trainer

    root, base, clf = tiny_setup
    opts = dict(iterations=2, updates_per_epoch="null", ckpt_every=0)
    full = _recipe().run(_compose(_overrides(base, clf, **opts)), tmp_path / "full")
    assert full.iteration == 2 and len(full.losses) == 2
    run = _build(base, clf, **opts)
    assert run.steps_per_iteration == 2
    tcfg = dataclasses.replace(run.trainer_config, max_steps=3, ckpt_every=1)
    Trainer(run.objective, tcfg, tmp_path / "part", run_config=run.run_config,
            accelerator=run.accelerator).train()
    _recipe().run(_compose(_overrides(base, clf, resume="auto", **opts)), tmp_path / "part")
    want = ckpt_io.load_weights(tmp_path / "full" / "checkpoints" / "step_0000004" / "model.safetensors")
    got = ckpt_io.load_weights(tmp_path / "part" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_recipe_clear_errors(tiny_setup, tmp_path):
    root, base, clf = tiny_setup
    nft = _recipe()
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python train/dit.py"):
        nft.run(_compose(_overrides(tmp_path / "nowhere", clf)), tmp_path / "a")
    vp_base = make_base(tmp_path / "vp", process=VP(), prediction="eps")
    with pytest.raises(ValueError, match="rectified-flow base"):
        nft.run(_compose(_overrides(vp_base, clf)), tmp_path / "b")
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        nft.run(_compose(_overrides(base, clf, reward="aesthetic")), tmp_path / "c")
    with pytest.raises(ValueError, match="train_batch = 3 must divide the 8 samples"):
        nft.run(_compose(_overrides(base, clf, train_batch=3)), tmp_path / "d")
    with pytest.raises(ValueError, match="base=<checkpoint or run dir> is required"):
        nft.run(_compose([f"reward_opts.classifier={clf}"]), tmp_path / "e")


def test_recipe_stops_on_nan_loss(tiny_setup, tmp_path, monkeypatch):
    from difftools.training import NonFiniteLossError

    root, base, clf = tiny_setup
    original = NFTLoss.__call__

    def poisoned(self, *args, **kw):
        loss, logs = original(self, *args, **kw)
        return loss * float("nan"), logs

    monkeypatch.setattr(NFTLoss, "__call__", poisoned)
    # the engine's stop: at the first check (step 1 = iteration 1), before any checkpoint is written
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 1.*No checkpoint.*optim\.lr"):
        _recipe().run(_compose(_overrides(base, clf)), tmp_path / "nan")
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_cli_runs_and_reports_a_missing_base(tiny_setup, tmp_path):
    root, base, clf = tiny_setup
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(REPO / "train" / "nft.py"), f"hydra.run.dir={tmp_path / 'run'}",
           "cpu_threads=1",
           *_overrides(base, clf, iterations=1, reward="brightness", **{"reward_opts.target": 0.2})]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert difftools.load(tmp_path / "run").step == 1  # one optimizer step per iteration (2 micro-batches)
    rec = _iterations(tmp_path / "run")[0]
    # the reward saw the collected samples
    assert rec["reward_brightness"] == pytest.approx(rec["brightness"], abs=1e-6)
    bad = subprocess.run(cmd + [f"base={tmp_path / 'missing_base'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "missing_base" in bad.stderr and "python train/dit.py" in bad.stderr


def test_two_processes_collect_the_same_samples_as_one(tiny_setup, tmp_path):
    """torchrun, 2 CPU processes (gloo): per-device sizes come from the global ones, and iteration 1's
    collected samples (hence its rewards) are those of the one-process run, since image i's noise is
    seeded by (seed, i) whatever the device count."""
    root, base, clf = tiny_setup
    opts = dict(iterations=1, groups=4, train_batch=8)
    single = _recipe().run(_compose(_overrides(base, clf, **opts)), tmp_path / "one")
    assert single.iteration == 1
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train" / "nft.py"), f"hydra.run.dir={tmp_path / 'two'}", "cpu_threads=1",
           *_overrides(base, clf, **opts)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "16 samples per iteration = 4 groups x 4 over 2 device(s) = 8 per device" in out
    assert "train batch 8 global = 4 per device" in out
    one, two = _iterations(tmp_path / "one")[0], _iterations(tmp_path / "two")[0]
    assert two["reward_mean"] == pytest.approx(one["reward_mean"], abs=1e-6)
    assert two["reward_std"] == pytest.approx(one["reward_std"], abs=1e-6)
    assert difftools.load(tmp_path / "two").step == 1  # one optimizer step per iteration (2 micro-batches)


# ================================================================================== issue 15: recipe
def _build(base, clf, **extra):
    from difftools.rl.recipe import build_nft

    return build_nft(_compose(_overrides(base, clf, **extra)))


def test_shifted_times_are_the_released_codes_sd3_grid():
    """The released code trains at SD3's sampler times: diffusers' FlowMatchEulerDiscreteScheduler
    with shift 3 at 10 steps (timesteps / 1000), 1.0 down to 0.009."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from difftools.rl import shifted_times

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    expected = (scheduler.timesteps.double() / 1000).tolist()
    assert shifted_times(10, 3.0).tolist() == pytest.approx(expected, abs=1e-6)
    assert shifted_times(10, 3.0)[-2].item() == pytest.approx(0.278, abs=1e-3)
    assert shifted_times(10, 3.0)[-1].item() == pytest.approx(0.0089, abs=1e-4)


class _TimeSpy(nn.Module):
    """A velocity model that records every t it is called with."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, y=None):
        self.seen.append(t.detach().clone())
        return self.w * x


def _seen_times(loss: NFTLoss, n: int = 64) -> torch.Tensor:
    spy = _TimeSpy()
    x0 = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    loss(spy, spy, x0, None, torch.full((n,), 0.5), torch.Generator().manual_seed(1), spy)
    return torch.cat(spy.seen)


def test_t_floor_keeps_every_training_time_above_it():
    from difftools.rl import shifted_times

    grid = shifted_times(10, 3.0)
    unfloored = _seen_times(NFTLoss(Flow(), times=grid, t_per_sample=None))
    assert unfloored.min().item() < 0.3  # without the floor the grid's low times are trained on
    floored = _seen_times(NFTLoss(Flow(), times=grid, t_per_sample=None, t_floor=0.3))
    assert floored.min().item() >= 0.3
    kept = sorted(v for v in grid.float().tolist() if v >= 0.3)
    assert sorted(set(floored.tolist())) == pytest.approx(kept)
    uniform = _seen_times(NFTLoss(Flow(), times=None, t_per_sample=3, t_floor=0.5))
    assert uniform.min().item() >= 0.5 and uniform.numel() == 64 * 3 * 3  # theta, old, ref x 3 times
    with pytest.raises(ValueError, match=r"t_floor=0.6 leaves none of the training times \[0.5, 0.2\]"):
        NFTLoss(Flow(), times=[0.5, 0.2], t_floor=0.6)


def test_default_recipe_follows_the_released_code(tiny_setup):
    """Defaults (issue 15): shifted grid floored at 0.1 (9 of the 10 times, like the released code's 9 of
    10), the x0-adaptive form with the policy loss x5, one optimizer step per iteration accumulated over
    the whole collection, lr 1e-4 for full fine-tuning, weight decay 1e-4, EMA 0.9 with warm-up, groups
    keyed by label, the 'fast' old-policy schedule."""
    root, base, clf = tiny_setup
    from difftools.rl.recipe import build_nft

    cfg = _compose([f"base={base}", f"reward_opts.classifier={clf}", "device=cpu", "progress=false"])
    run = build_nft(cfg)
    loss, tcfg = run.objective.loss, run.trainer_config
    assert loss.form == "x0_adaptive" and loss.policy_scale == 5.0 and loss.ref_weight == 1e-4
    assert loss.times.numel() == 9 and loss.t_per_sample == 9
    assert loss.times.min().item() == pytest.approx(0.278, abs=1e-3) and loss.times.max().item() == 1.0
    assert run.collection.num_samples == 160 and tcfg.batch_size == 40
    assert tcfg.grad_accum == 4 and run.steps_per_iteration == 1 and tcfg.max_steps == 100
    assert tcfg.lr == 1e-4 and tcfg.weight_decay == 1e-4 and tcfg.optimizer == "adamw"
    assert tcfg.ema_decay == 0.9 and tcfg.ema_warmup and tcfg.warmup_steps == 0 and tcfg.grad_clip == 1.0
    assert run.collection.group_by == "label" and run.objective.old_schedule == (0.001, 0.5, 0)


def test_gradient_accumulation_over_micro_batches_equals_one_batch(tiny_setup):
    """One iteration of 8 samples as one batch of 8, or as 4 micro-batches of 2 accumulated into one
    optimizer step: the same update (plain SGD, lr 1, so the update IS the gradient). Each sample's
    times and noise are drawn per iteration, so they do not depend on the micro-batching; 4 separate
    steps of 2 give a different update."""
    import dataclasses

    from difftools.training import Trainer

    root, base, clf = tiny_setup

    def update(train_batch: int, updates_per_epoch: int) -> dict:
        run = _build(base, clf, iterations=1, groups=2, group_size=4, train_batch=train_batch,
                     updates_per_epoch=updates_per_epoch, **{"loss.t_per_sample": 2})
        tcfg = dataclasses.replace(run.trainer_config, optimizer="sgd", momentum=0.0, lr=1.0,
                                   weight_decay=0.0,
                                   grad_clip=0.0, ema_decay=0.0, ckpt_every=0)
        before = {k: v.clone() for k, v in run.objective.model.state_dict().items()}
        Trainer(run.objective, tcfg, None, accelerator=run.accelerator).train()
        return {k: v - before[k] for k, v in run.objective.model.state_dict().items()}

    one = update(8, 1)
    accumulated = update(2, 1)
    stepwise = update(2, 4)
    assert max(v.abs().max().item() for v in one.values()) > 1e-4  # the update is not trivially zero
    for k in one:
        assert torch.allclose(accumulated[k], one[k], rtol=1e-4, atol=1e-7), k
    assert max((stepwise[k] - one[k]).abs().max().item() for k in one) > 1e-5


def test_policy_scale_multiplies_the_policy_loss_only():
    g = torch.Generator().manual_seed(0)
    model = TinyFlow()
    x0, r = torch.randn(6, 2, generator=g), torch.rand(6, generator=g)
    values = {}
    for scale in (1.0, 5.0):
        loss = NFTLoss(Flow(), form="velocity", ref_weight=0.0, times=[1.0, 0.5], t_per_sample=1,
                       policy_scale=scale)
        value, logs = loss(model, copy.deepcopy(model).requires_grad_(False), x0, None, r,
                           torch.Generator().manual_seed(1))
        model.zero_grad()
        value.backward()
        values[scale] = (value.item(), [p.grad.clone() for p in model.parameters()])
    assert values[5.0][0] == pytest.approx(5 * values[1.0][0], rel=1e-6)
    pairs = zip(values[5.0][1], values[1.0][1], strict=True)
    assert all(torch.allclose(a, 5 * b, rtol=1e-5, atol=1e-6) for a, b in pairs)


def test_old_decay_is_indexed_by_optimizer_step_and_the_slow_schedule(tiny_setup, tmp_path):
    """The released code's decay uses the optimizer-step count: with 2 steps per iteration (one step per
    micro-batch) the decays after iterations 1 and 2 are 0.002 and 0.004, not 0.001 and 0.002."""
    from difftools.rl import old_schedule

    assert old_schedule("slow") == (0.0075, 0.999, 75) and old_schedule("fast") == (0.001, 0.5, 0)
    assert old_schedule("custom", 0.01, 0.9, 3) == (0.01, 0.9, 3)
    with pytest.raises(ValueError, match="old.schedule=custom needs"):
        old_schedule("custom")
    root, base, clf = tiny_setup
    _recipe().run(_compose(_overrides(base, clf, iterations=2, updates_per_epoch="null")), tmp_path / "r")
    records = _iterations(tmp_path / "r")
    assert [r["step"] for r in records] == [2, 4]
    assert [r["old_decay"] for r in records] == pytest.approx([0.002, 0.004])
    slow = _recipe().run(_compose(_overrides(base, clf, iterations=1, **{"old.schedule": "slow"})),
                         tmp_path / "s")
    assert slow.iteration == 1 and _iterations(tmp_path / "s")[0]["old_decay"] == 0.0  # flat for 75 steps


def test_groups_are_keyed_by_label_so_slots_of_one_label_share_a_mean():
    """12 slots over 10 classes: two labels fill two slots each. Keyed by label (the released code keys
    its groups by prompt), both slots of a label are centred on their joint mean."""
    from difftools.rl.objective import iteration_labels

    labels = iteration_labels(0, 0, 12, 10).repeat_interleave(2)  # 12 slots of 2 samples
    rewards = torch.arange(24, dtype=torch.float64)
    by_label = group_advantages(rewards, labels)
    by_slot = group_advantages(rewards, torch.arange(12).repeat_interleave(2))
    shared = [int(c) for c in torch.unique(labels) if (labels == c).sum() == 4]
    assert len(shared) == 2
    for c in shared:
        members = (labels == c).nonzero().flatten()
        assert by_label[members].sum().item() == pytest.approx(0.0, abs=1e-9)
        assert by_label[members].abs().max().item() > by_slot[members].abs().max().item()


def test_std_floor_keeps_nearly_equal_rewards_from_unit_advantages():
    rewards = torch.tensor([1.0, 1.001, 2.0, 2.001], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    plain = group_advantages(rewards, groups)
    floored = group_advantages(rewards, groups, std_floor=0.05)
    std = rewards.std(unbiased=False).item()  # dominated by the group means: 0.50
    assert plain[1].item() == pytest.approx(0.0005 / (std + 1e-4), rel=1e-6)
    tight = torch.tensor([1.0, 1.001, 1.0, 1.001], dtype=torch.float64)  # every group alike: std 0.0005
    assert group_advantages(tight, groups)[1].item() == pytest.approx(0.0005 / 0.0006, rel=1e-3)  # ~0.83
    floor_adv = group_advantages(tight, groups, std_floor=0.05)[1].item()
    assert floor_adv == pytest.approx(0.0005 / 0.0501, rel=1e-3)
    assert floored[1].item() == pytest.approx(plain[1].item(), rel=1e-9)  # above the floor: unchanged
    with pytest.raises(ValueError, match="std_floor must be >= 0"):
        group_advantages(rewards, groups, std_floor=-1.0)


# ---------------------------------------------------------------------------------- safeguards
def test_ref_deviation_is_logged_and_the_guard_stops_a_runaway(tiny_setup, tmp_path):
    from difftools.rl import RunawayError

    root, base, clf = tiny_setup
    ok = _recipe().run(_compose(_overrides(base, clf, iterations=2)), tmp_path / "ok")
    records = _iterations(tmp_path / "ok")
    assert ok.iteration == 2 and all(r["x0_norm"] > 0 for r in records)
    # one optimizer step per iteration: iteration 1 is computed entirely at the base weights
    assert records[0]["ref_deviation"] == 0.0 and records[1]["ref_deviation"] > 0
    message = (r"iteration 2: ref_deviation = mean \(v_theta - v_ref\)\^2 = [0-9.e-]+ "
               r"> guard.max_ref_deviation = 1e-12.*stop/checkpoints/step_0000001")
    with pytest.raises(RunawayError, match=message):
        _recipe().run(_compose(_overrides(base, clf, **{"guard.max_ref_deviation": 1e-12})),
                      tmp_path / "stop")
    # the runaway step was never saved
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").glob("step_*")) == ["step_0000001"]
    message = r"iteration 1: x0_norm = .* x the first iteration's .* > guard.max_x0_norm_ratio = 1e-06"
    with pytest.raises(RunawayError, match=message):
        _recipe().run(_compose(_overrides(base, clf, **{"guard.max_x0_norm_ratio": 1e-6})), tmp_path / "x0")


def test_guard_raise_kl_multiplies_the_reference_weight_and_resumes_with_it(tiny_setup, tmp_path):
    root, base, clf = tiny_setup
    guard = {"guard.max_ref_deviation": 1e-12, "guard.action": "raise_kl", "guard.max_ref_weight": 1.0}
    _recipe().run(_compose(_overrides(base, clf, iterations=3, **guard)), tmp_path / "full")
    # iteration 1 trains at the base (deviation 0); after iterations 2 and 3 the weight goes x10
    assert [r["ref_weight"] for r in _iterations(tmp_path / "full")] == pytest.approx([1e-4, 1e-4, 1e-3])
    state = ckpt_io.load_weights(tmp_path / "full" / "checkpoints" / "step_0000003" / "state" /
                                 "objective.safetensors")
    assert state["extra/ref_weight"].item() == pytest.approx(1e-2)  # what iteration 4 would use
    _recipe().run(_compose(_overrides(base, clf, iterations=2, **guard)), tmp_path / "part")
    _recipe().run(_compose(_overrides(base, clf, iterations=3, resume="auto", **guard)), tmp_path / "part")
    assert _iterations(tmp_path / "part")[-1]["ref_weight"] == pytest.approx(1e-3)  # restored, not 1e-4
    with pytest.raises(ValueError, match="raise_kl raises loss.ref_weight, which must then start > 0"):
        _build(base, clf, **guard, **{"loss.ref_weight": 0.0})


# ---------------------------------------------------------------------------------- LoRA (peft)
def _tiny_dit(dtype=torch.float32):
    from difftools.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(input_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2,
                num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.to(dtype).eval()


def test_lora_merges_into_the_base_exactly_and_starts_at_it():
    """W + (alpha / r) B A folded into a plain DiT gives the adapted model's output (float64, to 1e-12);
    with B = 0 (peft's gaussian init) the adapted model IS the base; adapters off = the base."""
    pytest.importorskip("peft", reason="pip install 'difftools[lora]'")
    from difftools.models.lora import LoRADiT

    base = _tiny_dit(torch.float64)
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), torch.tensor([1, 4, 7])
    with torch.no_grad():
        want = base(x, t, y)
        lora = LoRADiT(copy.deepcopy(base), rank=4, alpha=8.0)
        assert torch.equal(lora(x, t, y), want)  # B = 0 at the start
        for name, p in lora.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        adapted = lora(x, t, y)
        assert (adapted - want).abs().max().item() > 1e-3
        merged = lora.merged()
        assert type(merged).__name__ == "DiT"
        assert (merged(x, t, y) - adapted).abs().max().item() < 1e-12
        layer = lora.net.blocks[0].attn.qkv
        b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        by_hand = layer.base_layer.weight + (8.0 / 4) * b @ a
        assert torch.equal(merged.blocks[0].attn.qkv.weight, by_hand)
        with lora.adapters_disabled():
            assert torch.equal(lora(x, t, y), want)
        assert torch.equal(lora(x, t, y), adapted)  # re-enabled on exit
    with pytest.raises(ValueError, match="match no linear layer"):
        LoRADiT(copy.deepcopy(base), targets=["attn.nonexistent"])


def test_lora_recipe_trains_only_the_adapters_and_its_checkpoint_loads(tiny_setup, tmp_path):
    pytest.importorskip("peft", reason="pip install 'difftools[lora]'")
    from difftools.models.lora import LoRADiT

    root, base, clf = tiny_setup
    extra = {"lora.enabled": "true", "lora.rank": 4, "lora.alpha": 8.0, "optim.lr": "null", "iterations": 2}
    run = _build(base, clf, **extra)
    trained = [n for n, p in run.objective.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n and n.startswith("model.") for n in trained)
    assert run.trainer_config.lr == 3e-4 and run.objective.ref is None  # the reference = adapters off
    result = _recipe().run(_compose(_overrides(base, clf, **extra)), tmp_path / "lora")
    assert result.iteration == 2
    base_w = ckpt_io.load_weights(base / "ema.safetensors")
    model_w = ckpt_io.load_weights(tmp_path / "lora" / "checkpoints" / "step_0000002" / "model.safetensors")
    for k, v in model_w.items():
        if ".lora_B." in k:
            assert v.abs().max().item() > 0, k  # the adapters moved from B = 0
        elif ".lora_A." not in k:  # every base weight is bit-identical to the base's
            assert torch.equal(v, base_w[k[len("net."):].replace(".base_layer.", ".")]), k
    loaded = difftools.load(tmp_path / "lora")
    assert isinstance(loaded.model, LoRADiT) and loaded.step == 2 and loaded.model.num_classes == 10


# ---------------------------------------------------------------------------------- held-out evaluation
def test_class_diversity_and_best_selection_by_hand():
    from difftools.rl import BestSelection, beyond_frontier, class_diversity

    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 0: a pair at distance 5; 1: identical; 2: alone
    assert class_diversity(feats, labels) == pytest.approx((5.0 + 0.0) / 2)
    records = [{"step": k, "judge_accuracy": acc, "fd": fd_value}
               for k, acc, fd_value in ((1, 0.5, 1.0), (2, 0.7, 1.05), (3, 0.9, 1.5), (4, 0.7, 0.9))]
    assert BestSelection("judge_accuracy", 0.1).pick(records, fd_base=1.0)["step"] == 2  # 3 is too far in fd
    assert BestSelection("judge_accuracy", None).pick(records, fd_base=1.0)["step"] == 3
    assert BestSelection("fd", 0.1).pick(records, fd_base=1.0)["step"] == 4
    assert BestSelection("judge_accuracy", 0.1).pick(records[2:3], fd_base=1.0) is None
    cfg = [(0.47, 14.9), (0.60, 16.0), (0.80, 20.0)]  # a CFG frontier (accuracy, fd)
    assert beyond_frontier((0.70, 17.0), cfg) and not beyond_frontier((0.70, 18.5), cfg)
    assert beyond_frontier((0.85, 19.0), cfg) and not beyond_frontier((0.85, 21.0), cfg)
    assert not beyond_frontier((0.55, 16.5), [(0.60, 16.0)])  # dominated: more accurate with a lower fd


@pytest.fixture(scope="module")
def judge_setup(tiny_setup):
    """A judge (another tiny classifier, never used for training) and reference statistics of the
    digits training images in its feature space."""
    from difftools.data import build_dataset
    from difftools.metrics import build_extractor, compute_stats
    from difftools.metrics.classifier import FitResult, save_classifier

    root, base, clf = tiny_setup
    judge = save_classifier(root / "judge", tiny_classifier(seed=1), DIGITS_INFO, FitResult(0.5, 1.0, 1, 1.0))
    images = build_dataset("digits", split="train").images
    reference = compute_stats(images, build_extractor(judge)).save(root / "reference.npz")
    return judge, reference


def test_heldout_eval_logs_judge_fd_diversity_and_exports_the_best_checkpoint(tiny_setup, judge_setup,
                                                                               tmp_path):
    root, base, clf = tiny_setup
    judge, reference = judge_setup
    extra = {"eval.every": 1, "eval.judge": str(judge), "eval.reference": str(reference), "eval.n": 20,
             "eval.batch": 20, "eval.fd_tolerance": "null", "iterations": 3}
    result = _recipe().run(_compose(_overrides(base, clf, **extra)), tmp_path / "r")
    doc = json.loads((tmp_path / "r" / "heldout.json").read_text())
    evals = doc["evaluations"]
    assert [e["step"] for e in evals] == [0, 1, 2, 3] and all(e["n"] == 20 for e in evals)
    assert doc["fd_base"] == evals[0]["fd"] and doc["metric"].startswith("fd_clf_tiny")
    for e in evals:
        assert 0 <= e["judge_accuracy"] <= 1 and 0 <= e["reward_accuracy"] <= 1
        assert e["fd"] > 0 and e["diversity"] > 0
    # the rule, by hand: the highest judge accuracy after training (earliest on ties), reward ignored
    best = max(evals[1:], key=lambda e: (e["judge_accuracy"], -e["step"]))
    assert doc["best"]["step"] == best["step"] == result.best["step"]
    exported = ckpt_io.load_weights(tmp_path / "r" / "best" / "model.safetensors")
    ema = ckpt_io.load_weights(tmp_path / "r" / "checkpoints" / f"step_{best['step']:07d}" /
                               "ema.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert difftools.load(tmp_path / "r" / "best").step == best["step"]
    logged = [r for r in _metrics(tmp_path / "r") if "eval/judge_accuracy" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert [r["eval/fd"] for r in logged] == pytest.approx([e["fd"] for e in evals[1:]])
    with pytest.raises(ValueError, match="eval.every=1 needs eval.judge and eval.reference"):
        _build(base, clf, **{"eval.every": 1})


# ---------------------------------------------------------------------------------- the GPU experiment script
def test_gpu_experiment_script_smoke(tiny_setup, judge_setup, tmp_path):
    """scripts/nft_gpu.py --smoke on CPU: the CFG baseline at 5 scales, NFT at 3 reference weights plus
    a second seed, record evaluations, both goals, JSON and the two plots."""
    spec = importlib.util.spec_from_file_location("nft_gpu", REPO / "scripts" / "nft_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, base, clf = tiny_setup
    judge, reference = judge_setup
    ref_out = script.main(["reference", "--features", str(judge), "--data", "digits", "--out",
                           str(tmp_path / "ref.npz"), "--cpu"])
    from difftools.data import build_dataset
    from difftools.metrics.fid import Stats

    written, expected = Stats.load(ref_out), Stats.load(reference)  # the digits train split, judge features
    assert written.n == expected.n == len(build_dataset("digits", split="train"))
    assert torch.allclose(torch.as_tensor(written.mu), torch.as_tensor(expected.mu))
    assert written.feats is None and expected.feats is not None  # mean and covariance only: small to carry
    doc = script.main(["run", "--smoke", "--base", str(base), "--reward-clf", str(clf), "--judge-clf",
                       str(judge),
                       "--reference", str(ref_out), "--out", str(tmp_path / "exp")])
    assert [b["cfg_scale"] for b in doc["baseline"]["record_n"]] == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert [(r["ref_weight"], r["seed"]) for r in doc["runs"]] == [(1e-4, 0), (1e-2, 0), (1e-1, 0), (1e-2, 1)]
    for r in doc["runs"]:
        assert r["iterations"] == 2 and [e["step"] for e in r["heldout"]["evaluations"]] == [0, 1, 2]
        assert r["final_record"]["n"] == 20 and 0 <= r["final_record"]["judge_accuracy"] <= 1
    # the base without guidance is the same model and seeds in the baseline and in every run's step 0
    base_fd = doc["baseline"]["eval_n"][0]["fd"]
    assert doc["runs"][0]["heldout"]["evaluations"][0]["fd"] == pytest.approx(base_fd, rel=1e-5)
    assert set(doc["goals"]) == {"beyond_cfg_frontier", "fd_within_10pct_and_judge_plus_15"}
    saved = json.loads((tmp_path / "exp" / "nft_gpu.json").read_text())
    assert saved["runs"][3]["name"] == "w0.01_s1"
    assert (tmp_path / "exp" / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "exp" / "judge_vs_reward.png").stat().st_size > 10_000
    (tmp_path / "exp" / "frontier.png").unlink()
    assert script.main(["plot", str(tmp_path / "exp")])[0].stat().st_size > 10_000


def test_gpu_experiment_script_saves_as_it_goes(tiny_setup, judge_setup, tmp_path, monkeypatch):
    """A command stopped by the device's time limit during the second NFT run keeps the CFG baseline and
    the first run in nft_gpu.json, marked incomplete."""
    spec = importlib.util.spec_from_file_location("nft_gpu", REPO / "scripts" / "nft_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, base, clf = tiny_setup
    judge, reference = judge_setup
    import difftools.rl.recipe as recipe

    real_run_nft, calls = recipe.run_nft, []

    def run_nft_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("time limit")
        return real_run_nft(*a, **k)

    monkeypatch.setattr(recipe, "run_nft", run_nft_then_stop)
    with pytest.raises(KeyboardInterrupt):
        script.main(["run", "--smoke", "--base", str(base), "--reward-clf", str(clf), "--judge-clf",
                     str(judge), "--reference", str(reference), "--out", str(tmp_path / "exp")])
    saved = json.loads((tmp_path / "exp" / "nft_gpu.json").read_text())
    assert saved["complete"] is False
    assert [b["cfg_scale"] for b in saved["baseline"]["record_n"]] == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert [r["name"] for r in saved["runs"]] == ["w0.0001_s0"]
    assert saved["runs"][0]["final_record"]["n"] == 20
