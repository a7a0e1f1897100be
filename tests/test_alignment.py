"""SRA² VAE-feature alignment (arXiv 2601.17830): the loss (difftools/losses/alignment.py), its
default head and block, and the pre-registered experiment (scripts/align_experiment.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from difftools.losses import DenoisingLoss, build_loss
from difftools.losses.alignment import (
    AlignedLoss,
    AlignmentProjector,
    ProjectorShapeError,
    alignment_flops_overhead,
    default_align_depth,
    projector_flops,
    smooth_l1,
    unpatchify,
)
from difftools.models.dit import DiT, dit_from_preset
from difftools.process import make_process
from difftools.training import DenoisingObjective, Trainer, TrainerConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_dit(depth: int = 4) -> DiT:
    torch.manual_seed(0)
    model = DiT(
        input_size=8,
        in_channels=4,
        patch_size=2,
        hidden_size=32,
        depth=depth,
        num_heads=2,
        num_classes=10,
        class_dropout_prob=0.0,
    )
    # Give every adaLN-Zero gate a non-zero value so that gradients reach all of a block's weights
    # (at the zero init only the modulation layers would get gradient).
    for block in model.blocks:
        nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
        nn.init.normal_(block.adaLN_modulation[-1].bias, std=0.05)
    return model


def aligned(model: DiT, depth: int = 2, weight: float = 1.0) -> AlignedLoss:
    process = make_process("flow")
    return AlignedLoss(
        DenoisingLoss(process, prediction="flow"),
        hidden_size=model.hidden_size,
        patch_size=model.patch_size,
        target_channels=4,
        depth=depth,
        weight=weight,
    )


def test_smooth_l1_values():
    beta = 0.05
    z = torch.zeros(4)
    # |r| < beta: 0.5 r^2 / beta ; |r| >= beta: |r| - beta / 2 ; mean over the 4 elements
    r = torch.tensor([0.01, -0.02, 1.0, -2.0])
    expected = (0.5 * 0.01**2 / beta + 0.5 * 0.02**2 / beta + (1.0 - 0.025) + (2.0 - 0.025)) / 4
    assert smooth_l1(r, z, beta).item() == pytest.approx(expected, rel=1e-6)


def test_unpatchify_matches_dit_layout():
    model = tiny_dit()
    tokens = torch.randn(2, model.num_tokens, model.patch_size**2 * model.out_channels)
    ours = unpatchify(tokens, model.out_channels, model.patch_size, (model.grid_size, model.grid_size))
    assert torch.equal(ours, model.unpatchify(tokens))


def test_projector_shape_and_paper_widths():
    """Default head: 5 Linear layers with SiLU between, hidden widths 2D (not narrowing)."""
    proj = AlignmentProjector(hidden_size=384, out_channels=32, patch_size=2)
    linears = [m for m in proj.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 5 and sum(isinstance(m, nn.SiLU) for m in proj.mlp) == 4
    assert proj.dims == [384, 768, 768, 768, 768, 128]
    out = proj(torch.randn(3, 16, 384), (4, 4))
    assert out.shape == (3, 32, 8, 8)
    assert proj.flops_per_token() == 2 * (384 * 768 + 3 * 768 * 768 + 768 * 128)
    assert proj.num_parameters() == 384 * 768 + 3 * 768 * 768 + 768 * 128 + 4 * 768 + 128


def _meta_dit(preset: str, input_size: int = 32, in_channels: int = 4) -> DiT:
    with torch.device("meta"):  # shapes only: an XL/2 without allocating its 675 M weights
        return dit_from_preset(preset, input_size=input_size, in_channels=in_channels, num_classes=1000)


def test_default_head_on_dit_xl2_is_the_papers_size():
    """The paper's head on SiT-XL/2: about 18 M parameters, +4 % GFLOPs, block 8 (ImageNet 256:
    32x32x4 latents, 256 tokens). Ours: 18.63 M parameters, +4.02 % FLOPs per step."""
    model = _meta_dit("DiT-XL/2")
    with torch.device("meta"):
        node = {"prediction": "flow", "align": {"weight": 1.0, "depth": None, "widths": None}}
        loss = build_loss(node, model, make_process("flow"))
    params = loss.projector.num_parameters()
    assert 9e6 <= params <= 36e6  # within 2x of the paper's 18 M
    assert params == 1152 * 2304 + 3 * 2304 * 2304 + 2304 * 16 + 4 * 2304 + 16  # 18,625,552
    assert loss.depth == 8
    assert loss.flops_overhead(model) == pytest.approx(256 * loss.projector.flops_per_token()
                                                       / model.flops_per_image())
    assert 0.035 < loss.flops_overhead(model) < 0.045


@pytest.mark.parametrize("blocks, expected", [(1, 1), (2, 2), (4, 2), (12, 2), (16, 4), (18, 5), (24, 8),
                                              (28, 8), (40, 8)])
def test_align_depth_follows_the_model_depth(blocks, expected):
    assert default_align_depth(blocks) == expected


@pytest.mark.parametrize("preset, depth", [("DiT-S/2", 2), ("DiT-B/2", 2), ("DiT-L/2", 8), ("DiT-XL/2", 8)])
def test_build_loss_picks_the_block_unless_set(preset, depth):
    model = _meta_dit(preset)
    with torch.device("meta"):
        auto = build_loss({"prediction": "flow", "align": {"weight": 1.0}}, model, make_process("flow"))
        node = {"prediction": "flow", "align": {"weight": 1.0, "depth": 3, "widths": [8, 8]}}
        pinned = build_loss(node, model, make_process("flow"))
    assert auto.depth == depth
    assert pinned.depth == 3 and pinned.projector.widths == [8, 8]
    assert auto.projector.widths == [2 * model.hidden_size] * 4


def test_align_loss_zero_when_projection_equals_target():
    model = tiny_dit()
    loss = aligned(model)
    hidden = torch.randn(3, model.num_tokens, model.hidden_size)
    with torch.no_grad():
        target = loss.projector(hidden, (model.grid_size, model.grid_size))
    assert loss.align_loss(hidden, target).item() == 0.0
    # one element off by 1.0 (> beta): the mean loss is exactly (1 - beta/2) / numel
    off = target.clone()
    off[0, 0, 0, 0] += 1.0
    assert loss.align_loss(hidden, off).item() == pytest.approx((1.0 - 0.025) / target.numel(), rel=1e-4)


@pytest.mark.parametrize("depth", [None, 1, 2, 3])
def test_gradient_reaches_blocks_up_to_depth_only(depth):
    """The alignment term trains blocks 1..depth (and the projector) only; ``depth: null`` (the
    config default) is block 2 on this 4-block model."""
    model = tiny_dit(depth=4)
    if depth is None:
        loss = build_loss({"prediction": "flow", "align": {"weight": 1.0, "depth": None}}, model,
                          make_process("flow"))
        assert loss.depth == 2
        depth = 2
    else:
        loss = aligned(model, depth=depth)
    x0 = torch.randn(2, 4, 8, 8)
    t = torch.rand(2)
    y = torch.tensor([1, 2])
    _, hidden = model(x0 + torch.randn_like(x0), t, y, return_hidden=depth)
    loss.align_loss(hidden, x0).backward()
    for i, block in enumerate(model.blocks, start=1):
        grads = [p.grad for p in block.parameters()]
        if i <= depth:
            assert block.attn.qkv.weight.grad is not None and block.attn.qkv.weight.grad.abs().sum() > 0
            assert block.mlp.fc1.weight.grad.abs().sum() > 0
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), f"block {i} got gradient"
    assert model.final_layer.linear.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.projector.parameters())


def test_forward_logs_and_denoising_part_unchanged():
    model = tiny_dit()
    model.eval()  # no label dropout: both calls see the same conditioning
    loss_fn = aligned(model, depth=2, weight=0.7)
    plain = DenoisingLoss(make_process("flow"), prediction="flow")
    x0, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    total, logs = loss_fn(model, x0, y, generator=torch.Generator().manual_seed(3))
    ref, _ = plain(model, x0, y, generator=torch.Generator().manual_seed(3))
    assert {"loss_denoise", "loss_align", "loss"} <= set(logs)
    # the probe does not change what the denoising loss computes (same t, eps, forward)
    assert logs["loss_denoise"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert total.item() == pytest.approx(ref.item() + 0.7 * logs["loss_align"].item(), rel=1e-6)
    assert logs["loss_align"].item() > 0


def test_build_loss_off_by_default_and_projector_outside_model():
    model = tiny_dit()
    process = make_process("flow")
    off = build_loss({"prediction": "flow"}, model, process)
    assert isinstance(off, DenoisingLoss)
    off0 = build_loss({"prediction": "flow", "align": {"weight": 0.0, "depth": 2}}, model, process)
    assert isinstance(off0, DenoisingLoss)
    on = build_loss(
        {
            "prediction": "flow",
            "align": {"weight": 1.0, "depth": 2, "beta": 0.05, "features": "latent", "widths": [16, 8, 8, 8]},
        },
        model,
        process,
    )
    assert isinstance(on, AlignedLoss) and on.depth == 2 and on.projector.dims == [32, 16, 8, 8, 8, 16]
    model_ids = {id(p) for p in model.parameters()}
    assert all(id(p) not in model_ids for p in on.parameters())
    assert any(k.startswith("projector.") for k in on.state_dict())
    assert not any("projector" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="depth"):
        aligned(model, depth=9)(model, torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))


def test_encoder_features_target_through_vae():
    """features="encoder": the target is the autoencoder's hidden map of the decoded clean latent."""
    from difftools.models.vae import build_autoencoder

    ae = build_autoencoder("identity", channels=4)
    model = tiny_dit()
    loss = AlignedLoss(
        DenoisingLoss(make_process("flow")),
        model.hidden_size,
        model.patch_size,
        target_channels=4,
        depth=1,
        features="encoder",
        vae=ae,
    )
    x0 = torch.rand(2, 4, 8, 8) * 2 - 1
    assert torch.equal(loss.target(x0), x0)
    with pytest.raises(ValueError, match="needs the autoencoder"):
        AlignedLoss(DenoisingLoss(make_process("flow")), 32, 2, 4, features="encoder")


def test_analytic_flops_overhead_dit_s2():
    """DiT-S/2 on 8x8x32 latents (TAEF2, 64px): the default head (widths 768) costs 9.75 % of the
    forward FLOPs; the target (the clean latent) costs nothing."""
    model = dit_from_preset("DiT-S/2", input_size=8, in_channels=32)
    proj = AlignmentProjector(model.hidden_size, 32, model.patch_size)
    ratio = alignment_flops_overhead(model, proj)
    per_token = 2 * (384 * 768 + 3 * 768 * 768 + 768 * 128)
    assert ratio == pytest.approx(16 * per_token / model.flops_per_image())
    assert ratio == pytest.approx(0.0975, abs=5e-4)


class _ConvAutoencoder(nn.Module):
    """Stands in for a VAE: a 1x1-conv decoder (4 -> 3 channels) and a 1x1-conv "encoder hidden map"
    (3 -> 8 channels), so the FLOPs of a target are known exactly."""

    def __init__(self):
        super().__init__()
        self.dec, self.enc = nn.Conv2d(4, 3, 1), nn.Conv2d(3, 8, 1)

    def decode(self, z):
        return self.dec(z)

    def features(self, x, name):
        assert name == "encoder"
        return self.enc(x)

    def feature_channels(self, name):
        return 8


def test_encoder_features_cost_is_counted():
    """features="encoder" (an extension, not the paper) decodes and re-encodes x0 every step: that
    forward-only cost enters the overhead as (3 P + T) / (3 F)."""
    model = tiny_dit()
    vae = _ConvAutoencoder()
    loss = build_loss({"prediction": "flow", "align": {"weight": 1.0, "features": "encoder"}}, model,
                      make_process("flow"), vae)
    target_flops = 2 * 4 * 3 * 64 + 2 * 3 * 8 * 64  # two 1x1 convs on an 8x8 latent
    assert loss.target_flops_per_image((4, 8, 8)) == target_flops
    p = projector_flops(loss.projector, model.num_tokens)
    assert loss.flops_overhead(model) == pytest.approx((3 * p + target_flops) / (3 * model.flops_per_image()))
    node = {"prediction": "flow", "align": {"weight": 1.0, "widths": loss.projector.widths}}
    latent = build_loss(node, model, make_process("flow"))
    assert latent.target_flops_per_image((4, 8, 8)) == 0
    p_latent = projector_flops(latent.projector, model.num_tokens)  # 4 output channels instead of 8
    assert latent.flops_overhead(model) == pytest.approx(p_latent / model.flops_per_image())


def test_projector_of_other_widths_is_refused_by_name(tmp_path):
    """Resuming an aligned run whose projector was saved with the earlier default widths
    (D/2, D/4, D/8, D/8) under today's default (2D) says which widths to set."""
    process = make_process("flow")
    x = torch.randn(8, 4, 8, 8)
    data = torch.utils.data.TensorDataset(x, torch.arange(8) % 10)

    def run(widths, max_steps, resume=None):
        model = tiny_dit()
        loss = build_loss({"prediction": "flow", "align": {"weight": 1.0, "widths": widths}}, model, process)
        objective = DenoisingObjective(model, loss, process, "flow")
        config = TrainerConfig(batch_size=4, max_steps=max_steps, warmup_steps=0, log_every=1, progress=False,
                               tensorboard=False, device="cpu", sample_every=0, sample_num=4, sample_steps=2,
                               resume=resume)
        return Trainer(objective, config, tmp_path / "run", dataset=data).train()

    run([16, 8, 4, 4], max_steps=1)
    message = "set loss.align.widths=[16, 8, 4, 4] to load it"
    with pytest.raises(ProjectorShapeError, match=re.escape(message)):
        run(None, max_steps=2, resume="auto")
    assert run([16, 8, 4, 4], max_steps=2, resume="auto").step == 2  # the named widths load it


# ------------------------------------------------------------------------------------ the experiment
def _experiment():
    path = REPO / "scripts" / "align_experiment.py"
    spec = importlib.util.spec_from_file_location("align_experiment_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _power_curve(steps, shift=1.0):
    """fd = 100 (shift * s)^-1/2: a run ``shift`` times as fast as fd = 100 s^-1/2."""
    return {"step": list(steps), "fd": [100.0 * (shift * s) ** -0.5 for s in steps]}


def test_speedup_is_exact_on_power_law_curves():
    exp = _experiment()
    steps = [750, 1500, 2250, 3000, 4500, 6000]
    ref = _power_curve(steps)
    # log-log interpolation is exact on a power law: fd(3000) of the reference is reached at 3000
    s, note = exp.steps_to_reach(steps[:2] + steps[4:], [ref["fd"][i] for i in (0, 1, 4, 5)], ref["fd"][3])
    assert s == pytest.approx(3000) and note == ""
    assert exp.speedup(ref, _power_curve(steps, 2.0), 6000)["value"] == pytest.approx(2.0)
    assert exp.speedup(ref, _power_curve(steps, 2.0), 3000)["value"] == pytest.approx(2.0)
    slower = exp.speedup(ref, _power_curve(steps, 0.5), 6000)
    assert slower["value"] == pytest.approx(0.5) and slower["steps_ref"] == pytest.approx(3000)
    # much faster than the first evaluation can resolve: a bound, said so
    fast = exp.speedup(ref, _power_curve(steps, 100.0), 3000)
    assert fast["value"] == pytest.approx(4.0) and fast["note"] == "lower bound: before first evaluation"
    assert exp.speedup(ref, {"step": [750], "fd": [1.0]}, 3000)["note"] == "not evaluated yet"


@pytest.mark.parametrize("sp, aa, expected", [
    (1.30, 1.10, "faster"), (1.08, 0.95, "faster"), (1.04, 1.01, "no effect"), (1.10, 1.20, "no effect"),
    (0.80, 1.10, "slower"), (0.97, 0.99, "no effect"), (None, 1.0, "undetermined")])
def test_verdict_counts_only_beyond_the_aa_gap(sp, aa, expected):
    """Counted when above max(A/A, 1/A/A, 1.05); 1.08 against an A/A of 0.95 (gap 1/0.95 = 1.053)."""
    assert _experiment().verdict(sp, aa, 0.05).startswith(expected)


@pytest.mark.parametrize("argv, message", [
    (["--arms", "aligned:0", "aligned:1"], "needs a vanilla arm"),
    (["--arms", "vanilla:0", "vanilla:0"], "lists an arm twice"),
    (["--eval-fractions", "0.25", "1.0"], "must include 0.5"),
    (["--until", "7000"], "--until must be in 1..--steps (6000)"),
])
def test_experiment_refuses_a_protocol_it_cannot_judge(argv, message, capsys):
    with pytest.raises(SystemExit):
        _experiment().parse_args(["--out", "x", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["alignedx0:0", "alignedx-1:0", "aligned", "aligned:x", "repa:0"])
def test_experiment_refuses_bad_arm_specs(spec):
    with pytest.raises(SystemExit, match=re.escape(f"--arms {spec!r}: expected KIND:SEED")):
        _experiment().parse_args(["--out", "x", "--arms", "vanilla:0", spec])


def test_experiment_default_recipe_is_the_papers():
    args = _experiment().parse_args(["--out", "x"])
    assert (args.hidden, args.depth, args.heads, args.patch) == (384, 12, 6, 1)  # DiT-S/1
    assert (args.steps, args.batch_size, args.lr, args.warmup, args.ema, args.t_dist) == (
        6000, 256, 1e-4, 0, 0.999, "uniform")
    assert [a.spec for a in args.arms] == ["aligned:0", "vanilla:0", "vanilla:1"]
    assert (args.align_depth, args.width_mult, args.align_beta, args.align_weight) == (None, 2.0, 0.05, 1.0)
    assert (args.eval_samples, args.solver, args.sample_steps) == (10000, "dpmpp_2m", 20)
    assert len(args.eval_fractions) >= 5


def _losses(run_dir: Path, key: str) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "full"
    return out, _experiment().main(["--smoke", "--out", str(out), "--export", str(out.parent / "export")])


def test_experiment_smoke_pairs_the_arms_and_reports(smoke_run):
    out, report = smoke_run
    assert report["complete"]
    runs = report["runs"]
    assert set(runs) == {"aligned_s0", "vanilla_s0", "vanilla_s1"}
    for run in runs.values():
        assert run["curve"]["step"] == [1, 2, 3, 4, 6, 8] and len(run["curve"]["fd"]) == 6
        assert all(math.isfinite(v) for v in run["curve"]["fd"] + run["curve"]["val_loss"])
    # seed 0 shared: same initial weights, batch, t, noise and label dropout -> the aligned arm's
    # denoising loss at step 1 equals the vanilla arm's; seed 1 differs
    aligned = _losses(out / "aligned_s0", "loss_denoise")
    vanilla0, vanilla1 = _losses(out / "vanilla_s0", "loss"), _losses(out / "vanilla_s1", "loss")
    assert aligned[1] == vanilla0[1] and vanilla1[1] != vanilla0[1]
    assert aligned[8] != vanilla0[8]  # the alignment term changed the training
    entry = report["summary"]["arms"]["aligned:0"]
    assert entry["head"]["depth"] == 2 and entry["head"]["widths"] == [64, 64, 64, 64]
    for budget in ("0.5", "1.0"):
        assert entry[budget]["fd"]["value"] > 0 and entry[budget]["fd"]["aa"] > 0
        verdicts = ("faster (beyond the A/A gap)", "slower (beyond the A/A gap)",
                    "no effect distinguishable from seed noise")
        assert entry[budget]["fd"]["verdict"] in verdicts
    assert entry["step_time_overhead"] is not None
    for name in ("results.json", "results.md", "curve.png", "log.txt", "protocol.json",
                 "samples_aligned_s0.png"):
        assert (out.parent / "export" / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "| aligned:0 | 50% (step 4) |" in table and "| aligned:0 | 100% (step 8) |" in table


def test_experiment_resumes_to_the_uninterrupted_numbers(smoke_run, tmp_path):
    """Two calls (--until 4, then the rest) give the fd curves of one uninterrupted call; a changed
    recipe is refused; an evaluation lost after its checkpoint is made up from that checkpoint."""
    exp = _experiment()
    full_out, full = smoke_run
    out = tmp_path / "split"
    first = exp.main(["--smoke", "--out", str(out), "--until", "4"])
    assert not first["complete"]
    assert first["runs"]["vanilla_s1"]["curve"]["step"] == [1, 2, 3, 4]
    assert first["summary"]["arms"]["aligned:0"]["0.5"]["fd"]["value"] is not None  # 50 % already judged
    with pytest.raises(exp.ProtocolMismatchError, match=r"lr: recorded 0\.001, now 0\.002"):
        exp.main(["--smoke", "--out", str(out), "--lr", "0.002"])
    second = exp.main(["--smoke", "--out", str(out)])
    assert second["complete"]
    for name, run in full["runs"].items():
        assert second["runs"][name]["curve"]["fd"] == pytest.approx(run["curve"]["fd"], rel=1e-9)
    # a call that ended between the final checkpoint and its evaluation
    metrics = out / "vanilla_s0" / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines()
             if '"eval/fd"' not in line or '"step": 8,' not in line]
    metrics.write_text("\n".join(lines) + "\n")
    third = exp.main(["--smoke", "--out", str(out)])
    assert third["complete"]
    made_up = third["runs"]["vanilla_s0"]["curve"]["fd"]
    assert made_up == pytest.approx(full["runs"]["vanilla_s0"]["curve"]["fd"], rel=1e-9)


def test_experiment_out_of_time_starts_nothing_and_says_so(tmp_path):
    """A call whose --time-budget-s is spent before an arm starts leaves that arm for the next call
    and still writes (incomplete) results."""
    report = _experiment().main(["--smoke", "--out", str(tmp_path), "--time-budget-s", "0.001"])
    assert not report["complete"]
    assert all(r["step"] is None and r["stopped_by"] == "not started" for r in report["runs"].values())
    assert "not started, the call's time budget is spent" in (tmp_path / "log.txt").read_text()
    assert report["summary"]["arms"]["aligned:0"]["1.0"] == {}
    assert (tmp_path / "results.md").is_file() and (tmp_path / "curve.png").is_file()
    # nothing has trained yet, so another recipe may still replace the recorded one
    _experiment().main(["--smoke", "--out", str(tmp_path), "--time-budget-s", "0.001", "--lr", "0.002"])
    assert json.loads((tmp_path / "protocol.json").read_text())["lr"] == 0.002
    log = (tmp_path / "log.txt").read_text()
    assert "no arm has trained yet; replacing the recorded recipe (['lr'])" in log


def test_experiment_with_classifier_features_and_a_stats_file(tmp_path):
    """--features <classifier dir> gives fd_<classifier> and class accuracy; --stats <file> (here the
    reference the first call computed and cached) gives the same numbers without the dataset's
    statistics being recomputed."""
    from difftools.data.base import DatasetInfo
    from difftools.metrics.classifier import FitResult, save_classifier
    from difftools.models.classifier import Classifier

    torch.manual_seed(0)
    clf = Classifier(1, 16, 10, widths=(4, 8), depth=1, name="clf_tiny").eval()
    info = DatasetInfo("digits", 1, 16, 10, tuple(str(k) for k in range(10)))
    clf_dir = save_classifier(tmp_path / "clf", clf, info, FitResult(0.0, 0.0, 0, 0.0))
    exp = _experiment()
    common = ["--smoke", "--features", str(clf_dir), "--arms", "vanilla:0", "aligned:0", "--steps", "4",
              "--eval-fractions", "0.5", "1.0"]
    first = exp.main([*common, "--out", str(tmp_path / "a")])
    curve = first["runs"]["aligned_s0"]["curve"]
    assert first["protocol_eval"]["metric"] == "fd_clf_tiny" and curve["step"] == [2, 4]
    assert all(0.0 <= a <= 1.0 for a in curve["class_acc"])
    (stats,) = (tmp_path / "a" / "cache" / "stats").glob("*.npz")
    second = exp.main([*common, "--out", str(tmp_path / "b"), "--stats", str(stats)])
    assert second["runs"]["aligned_s0"]["curve"]["fd"] == pytest.approx(curve["fd"], rel=1e-9)
    assert not (tmp_path / "b" / "cache").exists()
