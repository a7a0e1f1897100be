"""Divergence stops: non-finite loss / gradient norm / weights, loss spikes, vetted checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from test_training import REPO, _isolated, make_trainer, tiny_dit  # noqa: F401 (autouse fixture)

from difftools import checkpoint as ckpt_io
from difftools.losses import DenoisingLoss
from difftools.models.dit import DiT
from difftools.process import Flow
from difftools.training import DivergedError, NonFiniteLossError
from difftools.training.health import HealthMonitor, all_finite, skip_flag

INF, NAN = float("inf"), float("nan")


def _weights(ckpt, name="model.safetensors"):
    return ckpt_io.load_weights(ckpt / name)


def _events(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


class _InfGradient(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * INF


class _InfGradOnCalls(nn.Module):
    """Denoising loss whose gradient is inf on the given (1-based) calls."""

    def __init__(self, bad_calls):
        super().__init__()
        self.inner, self.calls, self.bad_calls = DenoisingLoss(Flow(), "flow"), 0, set(bad_calls)

    def forward(self, model, x0, y, generator=None):
        self.calls += 1
        loss, logs = self.inner(model, x0, y, generator)
        return (_InfGradient.apply(loss) if self.calls in self.bad_calls else loss), logs


# ---------------------------------------------------------------------------------- health rules
def test_health_monitor_patience_carries_across_windows_and_resets_on_a_good_step():
    hm = HealthMonitor(nonfinite_patience=2)
    v = hm.check(1, [1.0, 1.0, 1.0], [1.0, INF, INF], weights_finite=True)
    assert not v.stop and v.ok == [True, False, False] and v.skipped == [2, 3]
    v = hm.check(4, [1.0, 1.0], [INF, 1.0], weights_finite=True)  # 3rd in a row at step 4
    assert v.stop_kind == "nonfinite_grad_norm" and v.stop_step == 4 and "3 steps in a row" in v.reason
    hm = HealthMonitor(nonfinite_patience=2)
    v = hm.check(1, [1.0] * 5, [INF, INF, 1.0, INF, INF], weights_finite=True)  # never 3 in a row
    assert not v.stop and v.ok == [False, False, True, False, False]
    v = HealthMonitor(nonfinite_patience=0).check(1, [1.0], [NAN], weights_finite=True)
    assert v.stop_kind == "nonfinite_grad_norm"


def test_health_monitor_loss_weights_and_divergence_factor():
    v = HealthMonitor().check(5, [1.0, NAN, 1.0], [1.0, NAN, 1.0], weights_finite=True)
    assert (v.stop_kind, v.stop_step, v.ok) == ("nonfinite_loss", 6, [True])
    v = HealthMonitor().check(5, [1.0, 1.0], [1.0, 1.0], weights_finite=False)
    assert (v.stop_kind, v.stop_step, v.ok) == ("nonfinite_weights", 6, [True, True])
    # spike check: the median of the previous 4 losses is 1.0 at step 5 (9.9 < 10 x 1.0 passes) and
    # 1.5 at step 6 (median of 0.5, 2.0, 1.0, 9.9): 20 > 15 stops
    hm = HealthMonitor(divergence_factor=10, divergence_window=4)
    v = hm.check(1, [1.0, 0.5, 2.0, 1.0, 9.9, 20.0], [1.0] * 6, weights_finite=True)
    assert (v.stop_kind, v.stop_step) == ("diverged", 6) and "median 1.5" in v.reason
    hm = HealthMonitor(divergence_factor=10, divergence_window=4)  # window not yet full: no check
    assert not hm.check(1, [1.0, 1.0, 1.0, 100.0], [1.0] * 4, weights_finite=True).stop
    assert not HealthMonitor().check(1, [1.0, 1e30], [1.0, 1.0], weights_finite=True).stop  # off by default
    with pytest.raises(ValueError, match="divergence_factor"):
        HealthMonitor(divergence_factor=0.5)
    with pytest.raises(ValueError, match="nonfinite_patience"):
        HealthMonitor(nonfinite_patience=-1)


def test_all_finite_and_skip_flag():
    assert all_finite([torch.ones(3), torch.arange(3)]).item()
    assert not all_finite([torch.ones(3), torch.tensor([1.0, INF])]).item()
    assert not all_finite([torch.tensor([NAN])]).item()
    assert skip_flag(torch.tensor(INF)).item() == 1.0 and skip_flag(torch.tensor(3.0)).item() == 0.0


# ---------------------------------------------------------------------------------- trainer
def test_diverging_lr_names_a_vetted_checkpoint_that_resumes_with_a_sane_lr(tmp_path):
    """Issue 11: lr=1e30 wrote step k after the update that blew up; the 'last good checkpoint'
    was k. Now the named checkpoint is the newest one whose next step trained finitely, `latest`
    points at it, and resuming from it with a sane lr trains."""
    make_trainer(tmp_path, max_steps=4, ckpt_every=2).train()
    with pytest.raises(DivergedError) as info:
        make_trainer(tmp_path, resume="auto", lr=1e30, max_steps=12, ckpt_every=1, log_every=1).train()
    root = tmp_path / "checkpoints"
    good = root / "step_0000004"
    msg = str(info.value)
    assert "newest vetted checkpoint" in msg and str(good) in msg
    assert "Not vetted" in msg and "step_0000005" in msg  # written with the lr=1e30 update, not vetted
    assert ckpt_io.read_latest(root) == good and (root / "vetted").read_text() == "step_0000004\n"
    assert all(torch.isfinite(v).all() for v in _weights(good).values())
    assert _events(tmp_path)[-1]["vetted"] == str(good)
    # step_0000005 holds finite weights that produce inf at the next step: resuming from it fails again
    with pytest.raises(DivergedError):
        make_trainer(tmp_path / "bad", resume=str(root / "step_0000005"), max_steps=7, log_every=1).train()
    resumed = make_trainer(tmp_path, resume="auto", lr=1e-3, max_steps=10, log_every=1).train()
    assert resumed.step == 10 and len(resumed.losses) == 6
    assert all(v < 10 for v in resumed.losses), resumed.losses
    assert _events(tmp_path)[-1]["lr"] == pytest.approx(1e-3)  # this run's lr, not the checkpoint's 1e30


def test_lr_1e30_from_scratch_has_no_vetted_checkpoint_and_resume_auto_starts_fresh(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        make_trainer(tmp_path, lr=1e30, warmup_steps=0, ckpt_every=1, log_every=1).train()
    msg = str(info.value)
    assert msg.startswith(("training loss is inf at step 2", "training loss is nan at step 2"))
    assert "No checkpoint of this run is vetted" in msg and "Not vetted" in msg and "step_0000001" in msg
    root = tmp_path / "checkpoints"
    assert ckpt_io.read_latest(root) is None and not (root / "vetted").exists()
    fresh = make_trainer(tmp_path, resume="auto", max_steps=3, log_every=1).train()
    assert len(fresh.losses) == 3 and all(v < 10 for v in fresh.losses)


def test_tolerated_inf_gradients_skip_the_update(tmp_path):
    """Steps 3 and 4 have an inf gradient norm (2 <= patience 3): their updates are skipped, so the
    weights and optimizer state after step 4 equal those after step 2, and the run finishes."""
    tr = make_trainer(tmp_path, loss=_InfGradOnCalls({3, 4}), max_steps=6, ckpt_every=1, log_every=1)
    result = tr.train()
    root = tmp_path / "checkpoints"
    w2, w4, w5 = (_weights(root / f"step_000000{k}") for k in (2, 4, 5))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)
    assert any(not torch.equal(w4[k], w5[k]) for k in w4)
    opt2, opt4 = (ckpt_io.torch_load(root / f"step_000000{k}" / "state" / "optimizer.pt") for k in (2, 4))
    assert all(torch.equal(opt2["state"][i]["exp_avg"], opt4["state"][i]["exp_avg"]) for i in opt2["state"])
    assert all(float(s["step"]) == 2 for s in opt4["state"].values())
    assert result.step == 6 and len(result.losses) == 6
    records = {r["step"]: r for r in _events(tmp_path)}
    assert records[3]["skipped_steps"] == 1 and not math.isfinite(records[3]["grad_norm"])
    assert "skipped_steps" not in records[5]
    # steps 3 and 4 do not vet checkpoints 2 and 3; step 5 vets 4
    assert (root / "vetted").read_text() == "step_0000005\n"


def test_persistent_inf_gradients_stop_after_patience(tmp_path):
    tr = make_trainer(tmp_path, loss=_InfGradOnCalls(range(3, 100)), nonfinite_patience=2, ckpt_every=1,
                      log_every=1)
    with pytest.raises(DivergedError, match=r"gradient norm is (inf|nan) at step 5: 3 steps in a row "
                                            r".*\(trainer.nonfinite_patience=2") as info:
        tr.train()
    root = tmp_path / "checkpoints"
    assert str(root / "step_0000001") in str(info.value)  # step 2 trained on step 1; step 3 did not
    assert ckpt_io.read_latest(root).name == "step_0000001"
    assert not (root / "step_0000005").exists()
    assert _events(tmp_path)[-1]["event"] == "nonfinite_grad_norm"


class _PoisonedDiT(DiT):
    """A DiT whose buffer turns NaN on forward call ``bad_call`` (e.g. corrupted running stats):
    loss and gradients stay finite, only the weights show it."""

    def __init__(self, bad_call, **kw):
        super().__init__(**kw)
        self.register_buffer("stat", torch.zeros(1))
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x, t, y=None):
        self.calls += 1
        if self.calls == self.bad_call:
            self.stat.fill_(NAN)
        return super().forward(x, t, y)


def test_nonfinite_weights_are_never_written(tmp_path, monkeypatch):
    from difftools.models import registry

    # checkpoints are written for registered classes only; this test class is one for the run
    monkeypatch.setitem(registry._REBUILDABLE, registry.class_path(_PoisonedDiT), _PoisonedDiT)
    torch.manual_seed(0)
    model = _PoisonedDiT(3, input_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2,
                         num_classes=10)
    with pytest.raises(DivergedError, match="the weights contain NaN/inf after step 4") as info:
        make_trainer(tmp_path, model=model, ckpt_every=2, log_every=2).train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002"]
    assert str(root / "step_0000002") in str(info.value)
    for f in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(v).all() for v in _weights(root / "step_0000002", f).values())


def test_loss_spike_stops_when_divergence_factor_is_set(tmp_path):
    class Spike(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = DenoisingLoss(Flow(), "flow"), 0

        def forward(self, model, x0, y, generator=None):
            self.calls += 1
            loss, logs = self.inner(model, x0, y, generator)
            return (loss * 1e4 if self.calls == 7 else loss), logs

    with pytest.raises(DivergedError, match="at step 7 is above trainer.divergence_factor=100"):
        make_trainer(tmp_path, loss=Spike(), divergence_factor=100, divergence_window=4).train()
    assert _events(tmp_path)[-1]["event"] == "diverged"
    assert make_trainer(tmp_path / "off", loss=Spike()).train().step == 8  # off by default


def test_vetted_checkpoint_is_not_pruned(tmp_path):
    make_trainer(tmp_path, max_steps=6, ckpt_every=2, keep_last=1).train()
    root = tmp_path / "checkpoints"
    # step_6 is the newest (latest); step_4 is the newest vetted one (step 6 has no step 7 yet)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004", "step_0000006", "vetted"]


def test_vetted_pointer_survives_a_resume(tmp_path):
    """A run killed after writing step 8 resumes from it; step 9 diverges: the fallback is the
    vetted step 6 recorded by the first process, not step 8."""
    make_trainer(tmp_path, ckpt_every=2).train()
    from test_training import _NaNAfter

    with pytest.raises(NonFiniteLossError, match="nan at step 9") as info:
        make_trainer(tmp_path, loss=_NaNAfter(bad_call=1), resume="auto", max_steps=12).train()
    root = tmp_path / "checkpoints"
    assert str(root / "step_0000006") in str(info.value) and "Not vetted" in str(info.value)
    assert ckpt_io.read_latest(root).name == "step_0000006"


# ---------------------------------------------------------------------------------- CLI
def test_cli_lr_1e6_exits_nonzero_and_writes_no_garbage(tmp_path):
    """Issue 11: trainer.lr=1e6 logged grad norm inf on every step and ended 'done' with exit code 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(REPO / "train" / "dit.py"), f"hydra.run.dir={tmp_path}", "trainer.lr=1e6",
           "trainer.max_steps=20", "trainer.log_every=5", "trainer.ckpt_every=1", "trainer.progress=false",
           "trainer.tensorboard=false", "eval.enabled=false", "trainer.sample_num=4",
           "trainer.sample_steps=1", "trainer.batch_size=32", "model.hidden_size=32", "model.depth=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "DivergedError: gradient norm is inf" in proc.stderr and "nonfinite_patience=3" in proc.stderr
    assert "done:" not in proc.stderr + proc.stdout
    for ckpt in (tmp_path / "checkpoints").glob("step_*"):
        for f in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in _weights(ckpt, f).values()), (ckpt, f)
    assert not (tmp_path / "run.lock").exists()
