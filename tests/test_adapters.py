"""from_diffusers: tiny randomly initialised diffusers models (no download) as ModelFns."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difftools.process import DiscreteVP, Flow  # noqa: E402
from samplers import sample  # noqa: E402
from samplers.adapters import from_diffusers  # noqa: E402
from tests import tiny_diffusers  # noqa: E402


def tiny_unet():
    return tiny_diffusers.tiny_unet().double()


def tiny_dit():
    torch.manual_seed(0)
    return (
        diffusers.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
        .double()
        .eval()
    )


def test_unet_matches_diffusers_ddim_loop():
    unet = tiny_unet()
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )
    mf = from_diffusers(unet, sched)
    assert isinstance(mf.process, DiscreteVP) and mf.prediction == "v"
    assert torch.allclose(mf.process.alphas_cumprod, sched.alphas_cumprod.double())
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched.set_timesteps(5)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        times = torch.tensor([(float(k) + 1) / 1000 for k in sched.timesteps] + [0.001], dtype=torch.float64)
        ours = sample(mf, x_T, "ddim", times=times)
    assert mf.nfe == 5
    assert (ours - x).abs().max().item() < 1e-5


def test_config_dict_builds_the_same_process():
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    mf = from_diffusers(tiny_unet(), dict(sched.config))
    assert mf.prediction == "eps"
    assert torch.allclose(mf.process.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-6)


def test_dit_transformer_learned_sigma_and_labels():
    dit = tiny_dit()
    mf = from_diffusers(dit, diffusers.DDPMScheduler(num_train_timesteps=1000))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y = torch.tensor([3, 7])
    with torch.no_grad():
        out = mf.output(x, torch.tensor(0.5, dtype=torch.float64), y=y)
        raw = dit(x, torch.full((2,), 499.0, dtype=torch.float64), class_labels=y).sample
        assert out.shape == x.shape and torch.allclose(out, raw[:, :4], atol=1e-9)
        other = mf.output(x, torch.tensor(0.5, dtype=torch.float64), y=torch.tensor([1, 2]))
        assert (other - out).abs().max().item() > 0  # labels reach the model
        s = sample(mf.reset(), x, "unipc_bh2", steps=4, y=y)
    assert torch.isfinite(s).all() and mf.nfe == 4


def test_flow_matching_config():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    seen = []
    unet = tiny_unet()

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = unet

        def forward(self, x, timestep, return_dict=False, **kw):
            seen.append(float(timestep[0]))
            return self.inner(x, timestep, return_dict=return_dict, **kw)

    mf = from_diffusers(Spy(), sched)
    assert isinstance(mf.process, Flow) and mf.prediction == "flow"
    with torch.no_grad():
        sample(
            mf, torch.randn(1, 3, 8, 8, dtype=torch.float64), "ddim", steps=2, schedule="uniform_t", t_end=0.5
        )
    assert seen == [1000.0, 750.0]
