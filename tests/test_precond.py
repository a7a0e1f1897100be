"""EDM preconditioning wrapper (difftools.models.precond): coefficients, limits, training, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from test_training import _isolated, tiny_dit  # noqa: F401 (autouse fixture)

import difftools
from difftools import checkpoint as ckpt_io
from difftools.data import build_dataset
from difftools.losses import DenoisingLoss
from difftools.models.dit import DiT
from difftools.models.precond import EDMPrecond, apply_precond, edm_coefficients
from difftools.process import EDM, Flow
from difftools.training import DenoisingObjective, Trainer, TrainerConfig


def test_coefficients_match_table_1():
    """alpha = 1: c_in = 1/sqrt(s^2+sd^2), c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2)."""
    sd = 0.5
    for s in (0.002, 0.1, 0.5, 1.0, 80.0):
        c_in, c_skip, c_out = edm_coefficients(torch.tensor(1.0, dtype=torch.float64),
                                               torch.tensor(s, dtype=torch.float64), sd)
        assert c_in.item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_skip.item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert c_out.item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
    # s = sigma_data: c_skip = 1/2, c_out = sd / sqrt(2)
    _, c_skip, c_out = edm_coefficients(torch.tensor(1.0), torch.tensor(sd), sd)
    assert c_skip.item() == pytest.approx(0.5) and c_out.item() == pytest.approx(sd / math.sqrt(2))
    # general alpha: the coefficients on x_t equal Table 1 at s = sigma/alpha applied to x_t/alpha
    a, sig = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    s = sig / a
    c_in, c_skip, c_out = edm_coefficients(a, sig, sd)
    assert c_in.item() == pytest.approx((1 / (a * (s**2 + sd**2).sqrt())).item(), rel=1e-12)
    assert c_skip.item() == pytest.approx((sd**2 / (s**2 + sd**2) / a).item(), rel=1e-12)
    assert c_out.item() == pytest.approx((s * sd / (s**2 + sd**2).sqrt()).item(), rel=1e-12)


def test_zero_sigma_returns_x_and_zero_init_dit_gives_c_skip_x():
    """sigma -> 0: c_skip -> 1, c_out -> 0, so D(x) = x whatever the net says. At initialisation
    (adaLN-Zero: the DiT outputs exactly 0) D(x) = c_skip x at every sigma."""
    torch.manual_seed(1)
    process, x = EDM(), torch.randn(4, 1, 16, 16)
    precond = EDMPrecond(tiny_dit(), process)
    with torch.no_grad():
        for p in precond.parameters():  # a net with a non-zero output, to show c_out = 0 removes it
            p.add_(0.1 * torch.randn_like(p))
        out = precond(x, torch.zeros(4), torch.arange(4))
        assert precond.net(x, torch.zeros(4), torch.arange(4)).abs().max() > 1e-2
    assert (out - x).abs().max().item() == 0.0

    fresh = EDMPrecond(tiny_dit(), process).eval()
    t = torch.tensor([1e-4, 0.01, 0.1, 1.0])
    s = process.sigma(t)
    with torch.no_grad():
        out = fresh(x, t, torch.arange(4))
    expected = (0.25 / (s**2 + 0.25)).view(-1, 1, 1, 1) * x
    assert (out - expected).abs().max().item() < 1e-7


def test_flow_endpoint_is_finite_and_hidden_passes_through():
    """Flow at t = 1 has alpha = 0: the alpha-folded coefficients stay finite (c_skip = 0,
    c_out = sigma_data). ``return_hidden`` gives (D, hidden) with the inner net's hidden state."""
    model = EDMPrecond(tiny_dit(), Flow()).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out, hidden = model(x, torch.ones(2), torch.tensor([0, 1]), return_hidden=1)
    assert torch.isfinite(out).all() and out.abs().max().item() == 0.0  # zero-init net, c_skip = 0
    assert hidden.shape == (2, model.num_tokens, model.hidden_size)


def test_edm_training_starts_well_scaled(tmp_path):
    """process=edm on digits: the raw DiT starts at a loss ~26 (first step) / ~98 (first 10);
    preconditioned it starts at ~1.45 (unit-variance target) and falls below ~0.9 in 60 steps."""
    dataset = build_dataset("digits", image_size=16)
    process = EDM()
    model = apply_precond(tiny_dit(), "edm", process)
    loss = DenoisingLoss(process, "x0", "edm_lognormal", "edm")
    cfg = TrainerConfig(batch_size=32, max_steps=60, lr=1e-3, warmup_steps=10, log_every=10, ckpt_every=0,
                        sample_every=0, sample_num=10, sample_steps=2, progress=False, tensorboard=False,
                        device="cpu")
    objective = DenoisingObjective(model, loss, process, "x0", dataset_info=dataset.info)
    result = Trainer(objective, cfg, tmp_path, dataset=dataset).train()
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert first < 2.0, first  # measured 1.45 (raw DiT: 98)
    assert last < 0.75 * first, (first, last)  # measured 0.85

    loaded = difftools.load(result.checkpoint, use_ema=False)
    assert isinstance(loaded.model, EDMPrecond) and isinstance(loaded.model.net, DiT)
    assert loaded.prediction == "x0" and loaded.model.sigma_data == 0.5
    # weight files hold the inner DiT's keys, unprefixed (EMA / export / plain-DiT tools unchanged)
    keys = set(ckpt_io.load_weights(result.checkpoint / ckpt_io.EMA_FILE))
    assert keys == set(DiT(**loaded.model.net.config()).state_dict())


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(3)
    model = EDMPrecond(tiny_dit(), EDM(sigma_max=40.0), sigma_data=0.6, sigma_min=0.01, sigma_max=40.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ckpt_io.save_checkpoint(tmp_path / "step_1", model, process=model.process, prediction="x0")
    loaded = difftools.load(tmp_path)
    assert loaded.model.config() == model.config()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([0.001, 0.05, 0.9]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        assert (loaded.model(x, t, y) - model(x, t, y)).abs().max().item() == 0.0
    # a plain DiT loads the same weight file (the wrapper adds no keys and no prefix)
    plain = DiT(**model.net.config()).eval()
    plain.load_state_dict(ckpt_io.load_weights(tmp_path / "step_1" / ckpt_io.MODEL_FILE))
    with torch.no_grad():
        assert (plain(x, t, y) - model.net(x, t, y)).abs().max().item() == 0.0


def test_process_edm_config_builds_the_wrapper():
    """``python train/dit.py process=edm`` wraps the DiT; other processes leave it bare."""
    import importlib.util
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_dit", repo / "train" / "dit.py")
    train_dit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_dit)
    with initialize_config_dir(str(repo / "conf"), version_base="1.3"):
        edm, flow = compose("dit", overrides=["process=edm"]), compose("dit", overrides=[])
    assert edm.precond == "edm" and flow.precond == "none"
    _, _, model, process, loss = train_dit.build_run(edm)
    assert isinstance(model, EDMPrecond) and model.sigma_data == process.sigma_data == 0.5
    assert loss.prediction == "x0" and loss.weighting == "edm" and loss.t_distribution == "edm_lognormal"
    assert model.num_classes == 10 and model.null_class == 10 and model.in_channels == 1
    assert not isinstance(train_dit.build_run(flow)[2], EDMPrecond)
