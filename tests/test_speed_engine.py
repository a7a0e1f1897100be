"""The engine's speed paths: batches gathered on the device (same batches as the loader, exact
resume), the capturable optimizer and graph-form EMA, the whole-step CUDA graph (cuda-marked)."""

from __future__ import annotations

import pytest
import torch
from test_training import _isolated, make_trainer, small_digits, tiny_dit  # noqa: F401 (autouse fixture)
from torch.utils.data import DataLoader

from difftools.config import ConfigError
from difftools.training import TrainerConfig
from difftools.training.device_data import DeviceBatches, use_device_data
from difftools.training.ema import EMA
from difftools.training.graphed import make_capturable
from difftools.training.state import BatchPlan, ResumableBatchSampler


def test_device_batches_equal_the_loaders_batches_across_epochs_from_any_start():
    """96 items, batch 32: three batches per epoch; from batch 2 on, 7 batches cross two epoch
    boundaries. Images (with their random flips) and labels are identical, bit for bit."""
    ds = small_digits(96, flip=True)
    plan = BatchPlan(len(ds), 32, seed=5, flip=True)
    loader = iter(DataLoader(ds, batch_sampler=ResumableBatchSampler(plan, 2)))
    device_batches = DeviceBatches(ds, BatchPlan(len(ds), 32, seed=5, flip=True), 2, torch.device("cpu"))
    for k in range(2, 9):
        (x, y), (xd, yd) = next(loader), next(device_batches)
        assert torch.equal(x, xd) and torch.equal(y, yd)
        for row, (i, flip) in zip(xd, plan.indices(k), strict=True):  # the flips really happened
            assert torch.equal(row, ds.to_float(ds.images[i]).flip(-1) if flip else ds.to_float(ds.images[i]))
    assert sum(f for k in range(2, 9) for _, f in plan.indices(k)) > 50


def test_device_batches_are_this_ranks_share():
    ds = small_digits(96, flip=False)
    full = next(DeviceBatches(ds, BatchPlan(96, 32, seed=1), 4, torch.device("cpu")))
    halves = [next(DeviceBatches(ds, BatchPlan(96, 32, rank=r, world_size=2, seed=1), 4, torch.device("cpu")))
              for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), full[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), full[1])


def test_training_on_device_batches_matches_the_loader_and_resumes_exactly(tmp_path):
    """data_on_device=on (here on CPU) trains on the same batches as the loader: identical losses; a
    run resumed from step 4 continues with the uninterrupted run's losses."""
    on = make_trainer(tmp_path / "on", data_on_device="on").train()
    off = make_trainer(tmp_path / "off", data_on_device="off").train()
    assert on.losses == off.losses
    resumed = make_trainer(tmp_path / "on", data_on_device="on", max_steps=8,
                           resume=str(tmp_path / "on" / "checkpoints" / "step_0000004")).train()
    assert resumed.losses == on.losses[4:]


def test_data_on_device_errors():
    from difftools.data.text import CharText

    with pytest.raises(ValueError, match="data_on_device=on: cannot serve the dataset from the device: "
                                         "CharText is not an in-memory ArrayDataset"):
        use_device_data("on", CharText.__new__(CharText), torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of .*got 'yes'"):
        use_device_data("yes", small_digits(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="data_on_device"):
        TrainerConfig.from_dict({"data_on_device": "always"})
    # auto on CPU keeps the loader (nothing to gain without a GPU)
    assert not use_device_data("auto", small_digits(), torch.device("cpu"))


def test_cuda_graphs_refuses_a_run_it_cannot_capture(tmp_path):
    trainer = make_trainer(tmp_path, cuda_graphs=True, grad_accum=2, optimizer="sgd")
    expected = (r"trainer.cuda_graphs=true cannot capture this run: the run is on cpu, not CUDA; "
                r"trainer.grad_accum=2 \(1 only\); trainer.optimizer=sgd")
    with pytest.raises(ValueError, match=expected):
        trainer.train()


def test_ema_graph_form_matches_lerp_and_leaves_the_count_to_the_caller():
    model = tiny_dit()
    a, b = EMA(model, 0.99), EMA(model, 0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    a.update(model)
    b.update_with_weight(model, torch.tensor(1.0 - b.decay_at(0)))
    assert a.num_updates == 1 and b.num_updates == 0
    for k in a.shadow:
        torch.testing.assert_close(b.shadow[k], a.shadow[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a.shadow[k], model.state_dict()[k]) for k in a.shadow)  # it averaged


def test_capturable_optimizer_follows_the_schedule_like_the_float_one():
    """make_capturable: the lr becomes a tensor that LambdaLR fills (warmup then constant); the updates
    equal the float-lr fused AdamW's to fp32 round-off."""
    torch.manual_seed(0)
    ps = [torch.randn(5, 3, requires_grad=True) for _ in range(2)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    ref, opt = torch.optim.AdamW(ps, lr=1e-2, fused=True), torch.optim.AdamW(qs, lr=1e-2, fused=True)
    make_capturable(opt, torch.device("cpu"))
    warm = lambda k: (k + 1) / 3 if k < 3 else 1.0  # noqa: E731
    s_ref, s = torch.optim.lr_scheduler.LambdaLR(ref, warm), torch.optim.lr_scheduler.LambdaLR(opt, warm)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["capturable"]
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 / 3)
    for _ in range(6):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ref.step(), opt.step(), s_ref.step(), s.step()
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2)


@pytest.mark.cuda
def test_cuda_graphed_training_matches_eager_and_resumes(tmp_path):
    """DiT on digits, 12 steps on the GPU: the graphed step (3 eager warm-up steps, then capture and
    replays) follows the eager loss curve; a graphed run resumed at step 6 continues it."""
    kw = dict(device="auto", max_steps=12, ckpt_every=6, log_every=3, batch_size=32)
    eager = make_trainer(tmp_path / "eager", **kw).train()
    graphed = make_trainer(tmp_path / "graphed", cuda_graphs=True, **kw).train()
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=2e-2, atol=1e-3)
    resumed = make_trainer(tmp_path / "graphed", cuda_graphs=True,
                           resume=str(tmp_path / "graphed" / "checkpoints" / "step_0000006"), **kw).train()
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(graphed.losses[6:]), rtol=2e-2,
                               atol=1e-3)


@pytest.mark.cuda
def test_training_step_and_sampling_loop_never_wait_for_the_gpu():
    """With CUDA's sync debug mode set to error, a full training step (noise draws, fused-kernel DiT
    forward and backward, clipping, the found_inf skip flag, fused AdamW, EMA) and a guided sampling
    loop raise on any host synchronisation: there is none."""
    from difftools.losses import DenoisingLoss
    from difftools.process import Flow
    from difftools.training.health import skip_flag
    from samplers import ModelFn, sample
    from samplers.guidance import guided

    model = tiny_dit().cuda()
    loss_fn = DenoisingLoss(Flow(), "flow", "logit_normal")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ema = EMA(model, 0.999)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 1, 16, 16, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(model, x, y, generator=gen)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.found_inf = skip_flag(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    mf = guided(ModelFn(model.eval(), Flow(), "flow"), "cfg", 2.0, uncond={"y": torch.full_like(y, 10)})
    for _ in range(2):  # warm-up: lazy initialisation, the attention backend probe
        model.train()
        step()
        sample(mf, x, "dpmpp_2m", steps=3, y=y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.train()
        step()
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            sample(mf, x, "dpmpp_2m", steps=3, denoise_final=True, y=y)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_a_run_without_graphs_resumes_a_graphed_runs_optimizer_state(tmp_path):
    """A checkpoint written with trainer.cuda_graphs holds a capturable AdamW with a tensor lr; a run
    without graphs resumes it with a float lr and logs plain numbers."""
    import json

    make_trainer(tmp_path, max_steps=4).train()
    opt_file = tmp_path / "checkpoints" / "step_0000004" / "state" / "optimizer.pt"
    state = torch.load(opt_file, weights_only=True)
    for group in state["param_groups"]:  # as a graphed run saves it
        group["lr"], group["capturable"] = torch.tensor(group["lr"]), True
    torch.save(state, opt_file)
    trainer = make_trainer(tmp_path, max_steps=6, resume="auto")
    result = trainer.train()
    assert result.step == 6
    group = trainer.opt.optimizer.param_groups[0]
    assert isinstance(group["lr"], float) and not group["capturable"]
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["lr"], float) for r in records if "lr" in r)
