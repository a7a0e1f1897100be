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
def _isolated():
    """One torch thread (shared 2-core box) and a fresh accelerate state per test (a process-wide
    singleton that refuses a second device / precision)."""
    from accelerate.state import AcceleratorState

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(n)


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
    the old policy in state/objective.safetensors."""
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
    # the model moved away from the base, and the old policy trails it (d = 0, 0.001, 0.002)
    base_w = ckpt_io.load_weights(base / "ema.safetensors")
    model_w = ckpt_io.load_weights(ckpt / "model.safetensors")
    assert max((model_w[k] - base_w[k]).abs().max().item() for k in base_w) > 1e-4
    assert [r["old_decay"] for r in records] == pytest.approx([0.0, 0.001, 0.002])
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
    assert difftools.load(tmp_path / "run").step == 2  # optimizer steps: 2 micro-batches, one step each
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
    assert difftools.load(tmp_path / "two").step == 2  # optimizer steps: 2 micro-batches, one step each
