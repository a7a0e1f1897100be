"""The engine with objectives of other shapes than the DiT recipe: own data, extra state, frozen
helpers, gradient accumulation, SGD, the linear schedule, time limits, evaluation callbacks."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_training import _isolated, small_digits, tiny_dit  # noqa: F401 (autouse fixture)

import difftools
from difftools import checkpoint as ckpt_io
from difftools.checkpoint import CheckpointError
from difftools.data import build_dataset
from difftools.data.base import ArrayDataset
from difftools.losses import DenoisingLoss
from difftools.models.autoencoders import build_autoencoder
from difftools.process import Flow
from difftools.training import DenoisingObjective, Objective, Trainer, TrainerConfig
from difftools.training.optim import lr_lambda


class _Net(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(width, 1)

    def config(self):
        return {"width": self.lin.in_features}

    def forward(self, x):
        return self.lin(x)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """Checkpoints are written for registered classes only; _Net is one for the test."""
    from difftools.models import registry

    monkeypatch.setitem(registry._REBUILDABLE, registry.class_path(_Net), _Net)


class _Toy(Objective):
    """Regression onto a frozen teacher, shaped like the recipes the engine must carry: its own data
    (batch k is a function of k), a trained parameter besides the model (``scale``), a soft copy of
    the model updated after each step (extra state, like NFT's old policy) and an evaluation."""

    kind = "classifier"

    def __init__(self):
        torch.manual_seed(0)  # model and teacher: the same on every construction
        super().__init__(_Net())
        self.scale = nn.Parameter(torch.ones(()))
        self.register_frozen("teacher", nn.Linear(4, 1))
        self.old = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.eval_modes: list[bool] = []

    def batches(self, start, run):
        def batch(k):
            return torch.randn(8, 4, generator=torch.Generator().manual_seed(1000 + k))

        return (batch(k) for k in itertools.count(start))

    def forward(self, x, generator):
        target = self.teacher(x) + 0.1 * torch.randn(x.shape[0], 1, generator=generator)
        return (self.scale * self.model(x) - target).pow(2).mean(), {"scale": self.scale.detach()}

    def after_step(self, step):
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                self.old[k].lerp_(v, 0.5)
        return {"old_norm": sum(v.norm() for v in self.old.values())}

    def extra_state(self):
        return {f"old.{k}": v for k, v in self.old.items()}

    def load_extra_state(self, state):
        for k, v in self.old.items():
            v.copy_(state[f"old.{k}"])

    def evaluate(self, ema_model, step):
        self.eval_modes.append(ema_model.training)
        return {"weight_sum": ema_model.lin.weight.sum()}


def _config(**kw) -> TrainerConfig:
    opts = dict(batch_size=8, max_steps=6, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=3, keep_last=0,
                sample_every=0, ema_decay=0.9, progress=False, tensorboard=False, device="cpu")
    opts.update(kw)
    return TrainerConfig(**opts)


def _records(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def test_own_data_extra_state_and_frozen_helper_resume_bit_exactly(tmp_path):
    straight = _Toy()
    teacher_before = {k: v.clone() for k, v in straight.teacher.state_dict().items()}
    full = Trainer(straight, _config(), tmp_path / "a").train()
    first = Trainer(_Toy(), _config(max_steps=3), tmp_path / "b").train()
    resumed_objective = _Toy()
    resume = str(tmp_path / "b" / "checkpoints")
    resumed = Trainer(resumed_objective, _config(resume=resume), tmp_path / "c").train()
    assert len(full.losses) == 6 and first.losses + resumed.losses == full.losses  # exact float equality
    assert all(torch.equal(straight.old[k], resumed_objective.old[k]) for k in straight.old)
    assert torch.equal(straight.scale, resumed_objective.scale) and straight.scale.item() != 1.0
    # the frozen teacher: not trained, still in eval mode, not saved
    assert all(torch.equal(straight.teacher.state_dict()[k], v) for k, v in teacher_before.items())
    assert not straight.teacher.training and not any(p.requires_grad for p in straight.teacher.parameters())
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000006"
    state = ckpt_io.load_weights(ckpt / "state" / "objective.safetensors")
    assert sorted(state) == ["extra/old.lin.bias", "extra/old.lin.weight", "scale"]
    assert sorted(ckpt_io.load_weights(ckpt / "model.safetensors")) == ["lin.bias", "lin.weight"]
    loaded = difftools.load(ckpt, use_ema=False)
    assert isinstance(loaded.model, _Net) and torch.equal(loaded.model.lin.weight, straight.model.lin.weight)
    record = _records(tmp_path / "a")[-1]
    assert record["step"] == 6 and "epoch" not in record  # no dataset: no epochs
    assert record["scale"] == pytest.approx(straight.scale.item()) and record["old_norm"] > 0


def test_evaluation_callback_steps_and_log(tmp_path):
    objective = _Toy()
    result = Trainer(objective, _config(max_steps=5, eval_every=2, eval_at=[3]), tmp_path).train()
    assert [e["step"] for e in result.evaluations] == [2, 3, 4, 5]
    assert objective.eval_modes == [False] * 4  # the EMA copy is in eval mode
    logged = [r for r in _records(tmp_path) if "eval/weight_sum" in r]
    assert [r["step"] for r in logged] == [2, 3, 4, 5]
    assert logged[-1]["eval/weight_sum"] == pytest.approx(result.evaluations[-1]["weight_sum"])


def test_time_limit_stops_with_a_checkpoint_that_resumes(tmp_path):
    result = Trainer(_Toy(), _config(time_limit=0.0), tmp_path).train()
    assert result.stopped_by == "time_limit" and result.step == 1
    assert result.checkpoint == tmp_path / "checkpoints" / "step_0000001"
    assert ckpt_io.read_latest(tmp_path / "checkpoints") == result.checkpoint
    rest = Trainer(_Toy(), _config(resume="auto"), tmp_path).train()
    assert rest.stopped_by == "max_steps" and rest.step == 6 and len(rest.losses) == 5


def test_without_ema_the_ema_file_holds_the_model(tmp_path):
    objective = _Toy()
    Trainer(objective, _config(ema_decay=0.0, max_steps=3), tmp_path).train()
    ckpt = tmp_path / "checkpoints" / "step_0000003"
    model, ema = (ckpt_io.load_weights(ckpt / f) for f in ("model.safetensors", "ema.safetensors"))
    assert all(torch.equal(model[k], ema[k]) for k in model)
    assert torch.equal(model["lin.weight"], objective.model.lin.weight.detach())


def test_resume_refuses_another_optimizer_accumulation_or_objective(tmp_path):
    Trainer(_Toy(), _config(max_steps=3), tmp_path / "run").train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    with pytest.raises(CheckpointError, match=r"optimizer 'adamw', this run uses 'sgd'.*trainer\.optimizer"):
        Trainer(_Toy(), _config(optimizer="sgd", resume=str(ckpt)), tmp_path / "x").train()
    with pytest.raises(CheckpointError, match=r"grad accum 1, this run uses 2.*trainer\.grad_accum"):
        Trainer(_Toy(), _config(grad_accum=2, resume=str(ckpt)), tmp_path / "y").train()

    class Wider(_Toy):  # one more trained parameter than the checkpoint's objective had
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(()))

    with pytest.raises(CheckpointError, match=r"objective\.safetensors does not match this objective: "
                                              r"missing \['bias'\]"):
        Trainer(Wider(), _config(resume=str(ckpt)), tmp_path / "z").train()


class _Regression(Objective):
    kind = "classifier"

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(_Net())

    def forward(self, batch, generator):
        x, y = batch
        return F.mse_loss(self.model(x), y), {}


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_grad_accumulation_equals_one_large_batch_and_writes_nothing_in_memory(tmp_path, monkeypatch):
    """2 micro-batches of 16 per step see the items of one batch of 32 (same data order), and the
    mean of their losses' gradients is the gradient of the 32-batch mean."""
    monkeypatch.chdir(tmp_path)
    opts = dict(optimizer="sgd", momentum=0.0, lr=0.1, max_steps=3, grad_clip=0.0, ema_decay=0.0)

    def run(batch_size, grad_accum):
        objective = _Regression()
        result = Trainer(objective, _config(batch_size=batch_size, grad_accum=grad_accum, **opts),
                         None, dataset=_Pairs()).train()
        return result.losses, objective.model.lin.weight.detach()

    big_losses, big_w = run(32, 1)
    acc_losses, acc_w = run(16, 2)
    small_losses, small_w = run(16, 1)
    torch.testing.assert_close(acc_w, big_w, rtol=1e-6, atol=1e-7)
    assert acc_losses == pytest.approx(big_losses, rel=1e-6)
    assert not torch.allclose(small_w, big_w, rtol=1e-3, atol=0)  # the comparison is not vacuous
    assert list(tmp_path.iterdir()) == []  # out_dir=None: no checkpoints, metrics, lock


def test_sgd_nesterov_without_decay_on_1d_parameters():
    """A zero loss leaves only weight decay: W <- W - lr (wd W + momentum wd W) (first Nesterov step)
    for the 2-D weight, while the 1-D bias is not decayed."""

    class Zero(_Regression):
        def forward(self, batch, generator):
            return sum(p.sum() for p in self.model.parameters()) * 0.0, {}

    objective = Zero()
    w, b = objective.model.lin.weight.detach().clone(), objective.model.lin.bias.detach().clone()
    cfg = _config(optimizer="sgd", momentum=0.9, nesterov=True, no_decay_1d=True, weight_decay=0.1, lr=0.5,
                  max_steps=1, grad_clip=0.0, ema_decay=0.0)
    Trainer(objective, cfg, None, dataset=_Pairs()).train()
    torch.testing.assert_close(objective.model.lin.weight.detach(), w * (1 - 0.5 * 0.1 * 1.9))
    assert torch.equal(objective.model.lin.bias.detach(), b)


def test_linear_decay_is_the_one_cycle_shape():
    """Warmup (s + 1) / w for s < w, then (T - s) / (T - w): the classifier recipe's schedule."""
    f = lr_lambda(TrainerConfig(warmup_steps=3, max_steps=10, lr_decay="linear"))
    expected = [1 / 3, 2 / 3, 1.0] + [(10 - s) / 7 for s in range(3, 11)]
    assert [f(s) for s in range(11)] == pytest.approx(expected) and f(10) == 0.0
    with pytest.raises(ValueError, match="trainer.lr_decay must be one of"):
        lr_lambda(TrainerConfig(lr_decay="step"))


def test_objective_mistakes_are_clear_errors():
    class Holds(_Regression):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(self.model)  # stores the model a second time

    with pytest.raises(ValueError, match=r"objective parameter head\.0\.lin\.weight is one of the model's"):
        Trainer(Holds(), _config(), None, dataset=_Pairs()).train()
    with pytest.raises(TypeError, match="needs a difftools.training.Objective, got _Net"):
        Trainer(_Net(), _config(), None)
    with pytest.raises(ValueError, match="supplies no batches .* no dataset"):
        Trainer(_Regression(), _config(), None).train()
    with pytest.raises(ValueError, match="trainer.optimizer must be one of"):
        Trainer(_Regression(), _config(optimizer="lion"), None, dataset=_Pairs()).train()


# ---------------------------------------------------------------------------------- the DiT recipe
def test_latent_scale_is_fitted_on_a_fresh_run_and_read_back_on_resume(tmp_path):
    """An autoencoder without a scale gets 1 / std of the first training images' latents; a resumed
    run reads that scale from the checkpoint instead of fitting it again on its own data."""

    def objective(dataset):
        ae = build_autoencoder("identity", channels=1, scale="auto")
        assert ae.scale is None
        return DenoisingObjective(tiny_dit(), DenoisingLoss(Flow(), "flow"), Flow(), "flow", autoencoder=ae,
                                  dataset_info=dataset.info)

    first = small_digits()
    fresh = objective(first)
    Trainer(fresh, _config(batch_size=32, max_steps=2, ckpt_every=2), tmp_path, dataset=first).train()
    x = torch.stack([first[i][0] for i in range(len(first))]).float()
    assert fresh.autoencoder.scale == pytest.approx(1 / (x - x.mean()).pow(2).mean().sqrt().item(), rel=1e-5)
    node = ckpt_io.load_config(tmp_path / "checkpoints" / "step_0000002")["checkpoint"]
    assert node["autoencoder"]["scale"] == fresh.autoencoder.scale
    full = build_dataset("digits", image_size=16)
    other = ArrayDataset(full.images[96:192].clone(), full.labels[96:192].clone(), full.info)
    resumed = objective(other)
    Trainer(resumed, _config(batch_size=32, max_steps=3, resume="auto"), tmp_path, dataset=other).train()
    assert resumed.autoencoder.scale == fresh.autoencoder.scale
    assert resumed.autoencoder.shift == fresh.autoencoder.shift
