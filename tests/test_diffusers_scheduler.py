"""USFScheduler inside unmodified diffusers pipelines built from tiny random models (CPU, offline).

* Same method and grid as a native diffusers scheduler (``schedule="diffusers"``): the pipeline's
  result equals the native scheduler's to 1e-4 (float32; measured 1e-6): DDIM in ``DDPMPipeline``,
  DPM-Solver(++) multistep and UniPC in ``DiTPipeline`` with classifier-free guidance, Euler in
  ``StableDiffusion3Pipeline`` (flow matching, shift 3 and dynamic shifting).
* Ours alone (DualFast, singlestep and implicit solvers, a searched S³ schedule file): the pipeline's
  result equals ``samplers.sample`` on the same network wrapped by ``samplers.adapters.from_diffusers``
  (float64 models; the pipeline and samplers.sample evaluate the network at the same (timestep,
  input) sequence, which is compared too).
* The config round-trips (``save_config`` / ``from_pretrained``, and a saved pipeline loads back with
  this scheduler); misuse and unsupported combinations fail with errors that say what to do.

The networks predict v (VP) or velocity (flow): with an untrained network an eps prediction makes
x0 = (x - sigma eps)/alpha of order 1/alpha(1) ~ 200 at the first steps, and a float32 comparison would
test rounding at that scale instead of the method.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from samplers import ModelFn, sample  # noqa: E402
from samplers.adapters import from_diffusers  # noqa: E402
from samplers.diffusers import USFScheduler, source_class_name  # noqa: E402
from samplers.guidance import guided  # noqa: E402
from samplers.process import DiscreteVP, Flow  # noqa: E402
from samplers.schedule import SolverSchedule  # noqa: E402
from samplers.schedules import get_times  # noqa: E402
from samplers.usf import Strategy  # noqa: E402
from tests.tiny_diffusers import tiny_unet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NATIVE_TOL = 1e-4  # the bar for "same method and grid"
SAME_TOL = 1e-10  # ours vs samplers.sample in float64
SEARCHED_FLOW = REPO / "docs" / "search" / "digits_multi" / "schedule_nfe5.json"
SEARCHED_VP = REPO / "docs" / "search" / "mixture_vp-exact" / "schedule_nfe5.json"


# ------------------------------------------------------------------ tiny pipelines
def tiny_vae() -> diffusers.AutoencoderKL:
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()


def ddpm_pipeline(scheduler, dtype=torch.float32) -> diffusers.DDPMPipeline:
    pipe = diffusers.DDPMPipeline(unet=tiny_unet().to(dtype), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_pipeline(scheduler, dtype=torch.float32) -> diffusers.DiTPipeline:
    torch.manual_seed(2)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma, as the released DiTs
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    pipe = diffusers.DiTPipeline(transformer=dit.to(dtype), vae=tiny_vae().to(dtype), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(scheduler, dtype=torch.float32) -> diffusers.StableDiffusion3Pipeline:
    """SD3 with a tiny transformer; the text encoders are left out (prompt embeddings are passed)."""
    torch.manual_seed(3)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
    ).eval()
    none = dict.fromkeys(
        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer.to(dtype), scheduler=scheduler, vae=tiny_vae().to(dtype), **none
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_prompt(dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(4)
    return {
        "prompt_embeds": torch.randn(2, 5, 16, generator=g).to(dtype),
        "pooled_prompt_embeds": torch.randn(2, 8, generator=g).to(dtype),
    }


def record_steps(scheduler) -> list:
    """Observe (not change) every step: the returned points, in order."""
    seen, step = [], scheduler.step

    def spy(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append((out.prev_sample if kwargs.get("return_dict", True) else out[0]).clone())
        return out

    scheduler.step = spy
    return seen


def record_calls(module: torch.nn.Module) -> list:
    """(timestep, input) of every forward call of a diffusers network."""
    seen = []

    def hook(_, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen.append((float(torch.as_tensor(t).flatten()[0]), x.detach().clone()))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def run_ddpm(pipe, scheduler, steps: int) -> list:
    pipe.scheduler = scheduler
    seen = record_steps(scheduler)
    generator = torch.Generator().manual_seed(5)
    pipe(batch_size=2, generator=generator, num_inference_steps=steps, output_type="np")
    return seen


def run_dit(pipe, scheduler, steps: int, guidance_scale: float = 4.0) -> list:
    pipe.scheduler = scheduler
    seen = record_steps(scheduler)
    pipe(
        class_labels=[1, 7],
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(6),
        num_inference_steps=steps,
        output_type="pt",
    )
    return seen


def run_sd3(pipe, scheduler, steps: int, dtype=torch.float32) -> torch.Tensor:
    pipe.scheduler = scheduler
    out = pipe(
        **sd3_prompt(dtype),
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(7),
        num_inference_steps=steps,
        output_type="latent",
    )
    return out.images


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_same_calls(pipeline: list, ours: list) -> None:
    """The pipeline evaluated the network at the same timesteps and inputs as samplers.sample."""
    # the networks embed the timestep in float32 (get_timestep_embedding): the pipeline passes the
    # scheduler's float32 timesteps, samplers.sample the float64 value N t - 1 of the same t
    assert [t for t, _ in pipeline] == [float(torch.tensor(t, dtype=torch.float32)) for t, _ in ours]
    pairs = zip(pipeline, ours, strict=True)
    assert all(a.shape == b.shape and max_diff(a, b) <= SAME_TOL for (_, a), (_, b) in pairs)


# ------------------------------------------------------------------ same method and grid as diffusers
def test_ddim_in_ddpm_pipeline_equals_diffusers_ddim():
    native = diffusers.DDIMScheduler(clip_sample=False, prediction_type="v_prediction")
    pipe = ddpm_pipeline(native)
    ref = run_ddpm(pipe, native, 10)
    ours = USFScheduler.from_config(native.config, solver="ddim", schedule="diffusers")
    out = run_ddpm(pipe, ours, 10)
    assert ours.timesteps.tolist() == native.timesteps.float().tolist()  # 900, 800, ..., 0
    assert len(out) == len(ref) == 10
    assert max_diff(out[-1], ref[-1]) <= NATIVE_TOL
    assert ref[-1].abs().max() > 1.0  # the samples are of order one, the tolerance means something


MULTISTEP = [
    ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {}),
    ("dpmpp_3m", diffusers.DPMSolverMultistepScheduler, {"solver_order": 3}),
    (
        "dpm_solver_2m",
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    ("unipc_bh2", diffusers.UniPCMultistepScheduler, {}),
    ("unipc_bh2", diffusers.UniPCMultistepScheduler, {"solver_order": 3}),
    # (diffusers' UniPC bh1 gives NaN with final_sigmas_type="zero": B(h) = h is infinite there)
    ("unipc_bh1", diffusers.UniPCMultistepScheduler, dict(solver_type="bh1", final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("steps", [6, 16])
@pytest.mark.parametrize(("solver", "cls", "options"), MULTISTEP)
def test_multistep_in_dit_pipeline_equals_diffusers(solver, cls, options, steps):
    """DiT with classifier-free guidance (the pipeline runs cond and uncond halves through the scheduler);
    6 steps use lower-order final steps, 16 the plain recursion."""
    native = cls(prediction_type="v_prediction", **options)
    pipe = dit_pipeline(native)
    ref = run_dit(pipe, native, steps)
    order = native.config.solver_order
    ours = USFScheduler.from_config(native.config, solver=solver, schedule="diffusers", order=order)
    out = run_dit(pipe, ours, steps)
    assert len(out) == len(ref) == steps
    assert max_diff(out[-1], ref[-1]) <= NATIVE_TOL


@pytest.mark.parametrize("options", [{"shift": 3.0}, {"use_dynamic_shifting": True}])
def test_euler_in_sd3_pipeline_equals_flow_match_euler(options):
    """Flow matching: the shifted sigmas (or the pipeline's resolution-dependent mu) give the grid."""
    native = diffusers.FlowMatchEulerDiscreteScheduler(**options)
    pipe = sd3_pipeline(native)
    ref = run_sd3(pipe, native, 6)
    ours = USFScheduler.from_config(native.config, solver="euler", schedule="diffusers")
    out = run_sd3(pipe, ours, 6)
    assert isinstance(ours.process, Flow) and ours.prediction == "flow"
    assert torch.allclose(ours.timesteps, native.timesteps)
    assert max_diff(out, ref) <= NATIVE_TOL and ref.abs().max() > 1.0


# ------------------------------------------------------------------ ours: equals samplers.sample
@pytest.mark.parametrize(
    ("solver", "options", "nfe"),
    [
        ("unipc_bh2", {"dualfast": True}, 6),
        ("dpmpp_3m", {"dualfast": {"c": 0.3, "schedule": "constant"}}, 6),
        ("heun", {}, 12),  # the implicit corrector: each interior grid time twice in `timesteps`
        ("dpm_solver_3", {"schedule": "karras"}, 18),  # two stages per step
        ("dpmpp_2m", {"denoise_final": True}, 7),
    ],
)
def test_ddpm_pipeline_equals_samplers_sample(solver, options, nfe):
    config = diffusers.DDPMScheduler(clip_sample=False, prediction_type="v_prediction").config
    scheduler = USFScheduler.from_config(config, solver=solver, **options)
    pipe = ddpm_pipeline(scheduler, torch.float64)
    calls = record_calls(pipe.unet)
    out = run_ddpm(pipe, scheduler, 6)
    pipe_calls = calls[:]
    assert len(scheduler.timesteps) == len(pipe_calls) == nfe

    calls.clear()
    mf = from_diffusers(pipe.unet, config)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kw = {k: v for k, v in options.items() if k != "schedule"}
    with torch.no_grad():
        ref = sample(mf, x_T, solver=solver, steps=6, schedule=options.get("schedule", "logsnr"), **kw)
    assert mf.nfe == nfe
    assert_same_calls(pipe_calls, calls)
    assert max_diff(out[-1], ref) <= SAME_TOL


def every_decision_schedule(process) -> SolverSchedule:
    strategies = [
        Strategy("data", 1, afs=(0.0,)),  # the analytical first step: no evaluation at t = 1
        Strategy("data", 2, "bh2", corrector="pseudo", relax=0.2),
        Strategy("noise", 2, "dpm", singlestep=(0.5,)),
        Strategy("data", 3, "taylor", corrector="implicit", nodes=(1, 2, 3)),
        Strategy("data", 2, "bh1", corrector="pseudo"),
    ]
    return SolverSchedule(get_times(process, "logsnr", 5), strategies, process, name="hand-made")


def test_schedule_file_in_dit_pipeline_equals_samplers_sample(tmp_path):
    """A schedule with every USF decision (afs, pseudo and implicit correctors, a singlestep stage,
    extra nodes, relaxation) from its file, in DiT with guidance: DiTPipeline passes its model input
    through scale_model_input, which is where the analytical first step happens."""
    config = diffusers.DDPMScheduler(prediction_type="v_prediction", clip_sample=False).config
    sched = every_decision_schedule(USFScheduler.from_config(config).process)
    path = sched.save(tmp_path / "schedule.json")
    scheduler = USFScheduler.from_config(config, solver_schedule=str(path))
    pipe = dit_pipeline(scheduler, torch.float64)
    calls = record_calls(pipe.transformer)
    out = run_dit(pipe, scheduler, sched.nfe)
    pipe_calls = calls[:]
    assert len(scheduler.timesteps) == len(pipe_calls) == sched.nfe == 6

    calls.clear()
    mf = from_diffusers(pipe.transformer, config)
    y = torch.tensor([1, 7])
    cfg = guided(mf, "cfg", 4.0, uncond={"y": torch.full_like(y, 1000)})
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        ref = sched.sample(cfg, x_T, y=y)
    # the pipeline's model input is [x; x] (its cond and uncond halves), as inside our CFG wrapper
    assert_same_calls(pipe_calls, calls)
    assert max_diff(out[-1][:2], ref) <= SAME_TOL


def test_searched_flow_schedule_in_sd3_pipeline():
    """docs/search's 5-NFE schedule for a flow model (its first step is analytical). SD3 does not call
    scale_model_input, so that step cannot run there: a clear error, and afs=False runs the schedule
    with the model evaluated at t = 1 instead (6 NFE), equal to samplers.sample with that change."""
    native = diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = sd3_pipeline(native, torch.float64)
    scheduler = USFScheduler.from_config(native.config, solver_schedule=str(SEARCHED_FLOW))
    with pytest.raises(RuntimeError, match=r"analytical \(afs\).*scale_model_input.*afs=False"):
        run_sd3(pipe, scheduler, 5, torch.float64)

    scheduler = USFScheduler.from_config(native.config, solver_schedule=str(SEARCHED_FLOW), afs=False)
    out = run_sd3(pipe, scheduler, 5, torch.float64)
    assert len(scheduler.timesteps) == 6

    sched = SolverSchedule.load(SEARCHED_FLOW)
    strategies = [Strategy(**{**vars(sched.strategies[0]), "afs": None}), *sched.strategies[1:]]
    prompt = sd3_prompt(torch.float64)
    mf = from_diffusers(pipe.transformer, native.config)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        ref = sample(
            mf,
            x_T,
            solver="usf",
            times=sched.times,
            strategies=strategies,
            encoder_hidden_states=prompt["prompt_embeds"],
            pooled_projections=prompt["pooled_prompt_embeds"],
        )
    assert max_diff(out, ref) <= SAME_TOL


def test_flow_pipeline_with_dualfast_equals_samplers_sample(caplog):
    native = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = sd3_pipeline(native, torch.float64)
    scheduler = USFScheduler.from_config(native.config, solver="unipc_bh2", dualfast=True)
    out = run_sd3(pipe, scheduler, 5, torch.float64)
    prompt = sd3_prompt(torch.float64)
    mf = from_diffusers(pipe.transformer, native.config)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        ref = sample(
            mf,
            x_T,
            solver="unipc_bh2",
            steps=5,
            dualfast=True,
            encoder_hidden_states=prompt["prompt_embeds"],
            pooled_projections=prompt["pooled_prompt_embeds"],
        )
    assert max_diff(out, ref) <= SAME_TOL
    # a pipeline's own sigmas (Flux passes them always) shape only schedule="diffusers" grids: said once
    with caplog.at_level(logging.WARNING, logger="samplers.diffusers"):
        scheduler.set_timesteps(5, sigmas=[1.0, 0.8, 0.6, 0.4, 0.2], mu=0.5)
    assert "ignores the pipeline's sigmas, mu" in caplog.text


# ------------------------------------------------------------------ config
def test_config_round_trip_carries_the_schedule(tmp_path):
    native = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    sched = every_decision_schedule(USFScheduler.from_config(native.config).process)
    path = sched.save(tmp_path / "s.json")
    a = USFScheduler.from_config(native.config, solver_schedule=str(path), dualfast={"c": 0.25})
    a.save_config(tmp_path / "sched")
    path.unlink()  # the saved config holds the schedule itself, not its path
    saved = json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "USFScheduler" and saved["solver"] == "usf"
    assert saved["solver_schedule"]["strategies"] == sched.to_dict()["strategies"]
    assert saved["source_config"]["_class_name"] == "DPMSolverMultistepScheduler"
    assert saved["prediction_type"] == "v_prediction" and saved["num_train_timesteps"] == 1000  # mirrored

    b = USFScheduler.from_pretrained(tmp_path / "sched")
    c = USFScheduler.from_config(b.config)
    for other in (b, c):
        assert {k: v for k, v in other.config.items() if not k.startswith("_")} == {
            k: v for k, v in a.config.items() if not k.startswith("_")
        }
    a.set_timesteps(sched.nfe)
    b.set_timesteps(sched.nfe)
    assert torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(b.process.alphas_cumprod, native.alphas_cumprod.double())


def test_saved_pipeline_loads_back_with_the_scheduler(tmp_path):
    """save_pretrained records ("samplers.diffusers", "USFScheduler"); from_pretrained imports it there."""
    config = diffusers.DDPMScheduler(prediction_type="v_prediction", clip_sample=False).config
    pipe = ddpm_pipeline(USFScheduler.from_config(config, solver="unipc_bh2", dualfast=True))
    first = run_ddpm(pipe, pipe.scheduler, 5)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["scheduler"] == ["samplers.diffusers", "USFScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler).__name__ == "USFScheduler" and loaded.scheduler.config.dualfast is True
    again = run_ddpm(loaded, loaded.scheduler, 5)
    assert max_diff(again[-1], first[-1]) == 0.0


def test_source_class_and_process_of_configs_without_a_class_name():
    """A scheduler built in code has no _class_name in its config: the class is told by its keys."""
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert "_class_name" not in ddim.config and source_class_name(dict(ddim.config)) == "DDIMScheduler"
    s = USFScheduler.from_config(ddim.config)
    assert s.config.source_config["_class_name"] == "DDIMScheduler"
    assert isinstance(s.process, DiscreteVP)
    assert torch.equal(s.process.alphas_cumprod, ddim.alphas_cumprod.double())
    flow = USFScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler().config)
    assert isinstance(flow.process, Flow) and flow.prediction == "flow"
    obj = USFScheduler.from_config(diffusers.UniPCMultistepScheduler())  # the scheduler itself works too
    assert obj.config.source_config["_class_name"] == "UniPCMultistepScheduler"


def test_clipping_source_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="samplers.diffusers"):
        USFScheduler.from_config(diffusers.DDPMScheduler().config)  # clip_sample=True by default
    assert "clip_sample=True" in caplog.text and "without clipping" in caplog.text


# ------------------------------------------------------------------ the forward process
def test_add_noise_matches_diffusers():
    ddpm = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    ks = torch.tensor([0, 500, 999])
    ours = USFScheduler.from_config(ddpm.config)
    assert max_diff(ours.add_noise(x0, noise, ks), ddpm.add_noise(x0, noise, ks)) <= 1e-6
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(4)
    flow = USFScheduler.from_config(fm.config)
    t = fm.timesteps[1:2]
    assert max_diff(flow.scale_noise(x0, t, noise), fm.scale_noise(x0, t, noise)) <= 1e-6


def test_img2img_begins_at_a_step_boundary():
    """img2img pipelines noise their input to timesteps[i] (add_noise) and call set_begin_index(i): the
    run from there equals samplers.sample on the rest of the grid."""
    config = diffusers.DDPMScheduler(prediction_type="v_prediction", clip_sample=False).config
    unet = tiny_unet().double()
    mf = from_diffusers(unet, config)
    scheduler = USFScheduler.from_config(config, solver="unipc_bh2")
    scheduler.set_timesteps(8)
    begin = 3
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x = scheduler.add_noise(x0, noise, scheduler.timesteps[begin : begin + 1])
    scheduler.set_begin_index(begin)
    x_start = x
    with torch.no_grad():
        for t in scheduler.timesteps[begin:]:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        times = get_times(mf.process, "logsnr", 8)[begin:]
        ref = sample(mf, x_start, solver="unipc_bh2", times=times)
    assert max_diff(x, ref) <= SAME_TOL

    heun = USFScheduler.from_config(config, solver="dpmpp_2s")  # one stage between grid times
    heun.set_timesteps(4)
    heun.set_begin_index(1)  # timesteps[1] is step 0's stage
    with pytest.raises(ValueError, match=r"timesteps\[1\] = .* is a stage evaluation inside grid step 0"):
        heun.step(torch.zeros(1, 3, 8, 8), heun.timesteps[1], torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------ errors
def test_misuse_and_bad_options_are_refused(tmp_path):
    config = diffusers.DDPMScheduler(clip_sample=False).config
    s = USFScheduler.from_config(config, solver="ddim")
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"call set_timesteps\(...\) before step\(\)"):
        s.step(x, 999, x)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match=r"timestep 5 is not in this run's timesteps \[999.0, 302.3"):
        s.step(x, 5, x)  # an index from enumerate(timesteps), say
    s.set_timesteps(2)
    x = s.step(torch.zeros_like(x), 999, x).prev_sample
    with pytest.raises(ValueError, match=r"got timestep 999, but evaluation 1 of this run is at 302.3"):
        s.step(x, 999, x)
    s.set_timesteps(2)
    for t in s.timesteps:
        x = s.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(RuntimeError, match="evaluations are done; call set_timesteps"):
        s.step(x, s.timesteps[-1], x)

    with pytest.raises(ValueError, match="unknown solver 'dpmpp_9m'"):
        USFScheduler.from_config(config, solver="dpmpp_9m")
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        USFScheduler.from_config(config, schedule="cosine")
    with pytest.raises(ValueError, match="dualfast must be"):
        USFScheduler.from_config(config, dualfast="sometimes")
    with pytest.raises(ValueError, match="solver='usf' runs a schedule file"):
        USFScheduler.from_config(config, solver="usf")

    sched = every_decision_schedule(USFScheduler.from_config(config).process)
    path = str(sched.save(tmp_path / "s.json"))
    with pytest.raises(ValueError, match="solver='unipc_bh2' and solver_schedule were both given"):
        USFScheduler.from_config(config, solver="unipc_bh2", solver_schedule=path)
    with_file = USFScheduler.from_config(config, solver_schedule=path)
    with pytest.raises(ValueError, match=r"\(6 model evaluations\), but num_inference_steps=50; pass .*=6"):
        with_file.set_timesteps(50)
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        USFScheduler.from_config(config, solver_schedule=str(tmp_path / "missing.json"))
    # a schedule searched for another process: the file and both processes are named
    with pytest.raises(ValueError, match=r"schedule_nfe5.json: schedule 'searched' was made for VP\(linear.*"
                       r"describes DiscreteVP\(N=1000\)"):
        USFScheduler.from_config(config, solver_schedule=str(SEARCHED_VP))
    with pytest.raises(ValueError, match="unknown USFScheduler config keys \\['solvr'\\]"):
        USFScheduler.from_config({"_class_name": "USFScheduler", "solvr": "ddim"})


def test_import_samplers_needs_no_diffusers(tmp_path):
    """With diffusers unavailable, samplers and samplers.diffusers import; the scheduler class says
    what it needs."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoDiffusers(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "diffusers" or name.startswith("diffusers."):
                    raise ImportError(f"blocked for this test: {name}")
                return None

        sys.meta_path.insert(0, NoDiffusers())
        import samplers, samplers.diffusers
        try:
            samplers.diffusers.USFScheduler
        except ImportError as err:
            print("ImportError:", err)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImportError: samplers.diffusers.USFScheduler needs diffusers" in proc.stdout
    assert "pip install diffusers" in proc.stdout


@pytest.mark.parametrize(("dtype", "ulp"), [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
def test_low_precision_pipeline_keeps_a_float32_state(dtype, ulp):
    """A half-precision pipeline holds the latents in half precision between steps. The scheduler keeps
    its own float32 copy of the point it returned and uses it when the pipeline hands that point back
    unchanged: the result is samplers.sample's float32 solve (the network seeing half-precision inputs,
    as in the pipeline) rounded once at the end (measured: equal). Rounding the state at every step
    instead is off by 0.031 (bfloat16) / 0.0039 (float16), twice the bound used here."""
    config = diffusers.DDPMScheduler(prediction_type="v_prediction", clip_sample=False).config
    scheduler = USFScheduler.from_config(config, solver="dpmpp_2m")

    def net(x, timestep):
        k = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        return (0.5 * torch.tanh(x.float()) + 0.1 * torch.sin(k / 100)).to(x.dtype)

    scheduler.set_timesteps(20)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x_T.to(dtype)
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x).prev_sample
    assert x.dtype == dtype
    process = scheduler.process
    mf = ModelFn(lambda y, k: net(y.to(dtype), k).float(), process, "v", time_input=process.timestep)
    ref = sample(mf, x_T.to(dtype).float(), "dpmpp_2m", steps=20)
    assert max_diff(x, ref.to(dtype)) <= 2 * ulp  # one ulp of values in [2, 4)


def test_readme_snippet_runs():
    """The README's "Use with diffusers" snippet, as printed there: six evaluations, two images."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (snippet,) = [b for b in blocks if "USFScheduler.from_config" in b]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (2, 16, 16, 3)
    assert len(namespace["pipe"].scheduler.timesteps) == 6
