"""Checkpoint conversion: facebookresearch/DiT and SiT -> difftools, difftools <-> diffusers.

The DiT checks compare against outputs of the reference code itself (``shared/data/interop``: a tiny
facebookresearch/DiT model with perturbed weights, its inputs and its ``forward`` /
``forward_with_cfg`` outputs). The SiT checks derive SiT's conventions from its linear path
(x_s = s x + (1 - s) n, v = x - n) and, where SiT's network meets DiT's (s = 1 <-> DiT timestep 1),
compare against the reference outputs too. The diffusers checks run diffusers' own
``DiTTransformer2DModel`` and ``samplers.adapters.from_diffusers``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from safetensors.torch import load_file, save_file

import difftools
from difftools.checkpoint import save_checkpoint
from difftools.interop import ConversionError, read_state_dict
from difftools.interop import diffusers as idiff
from difftools.interop import dit as idit
from difftools.interop import sit as isit
from difftools.models.dit import DiT
from samplers.adapters import from_diffusers
from samplers.guidance import guided
from samplers.model import ModelFn
from samplers.process import VP, DiscreteVP, Flow

REPO = Path(__file__).resolve().parents[1]
DATA = SHARED_DATA / "interop"
WEIGHTS, CONFIG, IO = (
    DATA / "dit_reference_tiny.safetensors",
    DATA / "dit_reference_tiny.json",
    DATA / "dit_reference_tiny_io.safetensors",
)
ATOL = 1e-5

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"reference data not found under {DATA}")


@pytest.fixture(scope="module")
def io():
    return load_file(str(IO))


@pytest.fixture(scope="module")
def ref_cfg():
    return json.loads(CONFIG.read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return idit.convert(WEIGHTS, CONFIG, tmp_path_factory.mktemp("dit") / "ckpt")


def timesteps_to_t(k: torch.Tensor) -> torch.Tensor:
    """Reference timestep k -> our t = (k + 1) / 1000 (float64, as a caller would compute it)."""
    return (k.double() + 1) / 1000


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------ facebookresearch/DiT
def test_converted_dit_matches_the_reference_eps(converted, io):
    run = difftools.load(converted)
    assert isinstance(run.process, DiscreteVP) and run.prediction == "eps"
    mf = ModelFn(run.model, run.process, run.prediction)
    with torch.no_grad():
        eps = mf.eps(io["x"], timesteps_to_t(io["t"]), y=io["y"])  # y holds the null class 10 too
    assert eps.shape == io["x"].shape
    assert max_diff(eps, io["out"][:, :4]) < ATOL
    # one Python-float t per call (the samplers' usual form) agrees as well
    with torch.no_grad():
        for i, k in enumerate(io["t"].tolist()):
            e = mf.eps(io["x"][i : i + 1], (k + 1) / 1000, y=io["y"][i : i + 1])
            assert max_diff(e, io["out"][i : i + 1, :4]) < ATOL, k


def test_dit_process_is_the_reference_linear_schedule(converted):
    process = difftools.load(converted).process
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(process.alphas_cumprod, alphas_cumprod, rtol=0, atol=1e-15)
    # the reference's timestep k is our t = (k + 1) / 1000: alpha^2 there is alphas_cumprod[k]
    for k in (0, 249, 999):
        assert float(process.alpha((k + 1) / 1000)) ** 2 == pytest.approx(float(alphas_cumprod[k]), rel=1e-12)


def test_learned_sigma_channels_are_kept_exactly(converted, io):
    run = difftools.load(converted)
    assert run.model.learn_sigma and run.model.returned_channels == 4
    full = DiT(**{**run.model.config(), "return_sigma": True})
    full.load_state_dict(run.model.state_dict())
    with torch.no_grad():
        out = full.eval()(io["x"], timesteps_to_t(io["t"]).float(), io["y"])
    assert out.shape == io["out"].shape and max_diff(out, io["out"]) < ATOL


def test_drop_sigma_gives_the_same_eps_from_a_smaller_final_layer(tmp_path, io):
    run = difftools.load(idit.convert(WEIGHTS, CONFIG, tmp_path / "ckpt", drop_sigma=True))
    assert not run.model.learn_sigma and run.model.final_layer.linear.out_features == 2 * 2 * 4
    with torch.no_grad():
        eps = ModelFn(run.model, run.process, run.prediction).eps(io["x"], timesteps_to_t(io["t"]), y=io["y"])
    assert max_diff(eps, io["out"][:, :4]) < ATOL


def test_forward_with_cfg_through_our_cfg_wrapper(converted, io):
    """The reference guides only its first 3 channels (``eps, rest = model_out[:, :3], ...``); the rest of
    its output is the raw conditional (first half) and unconditional (second half) prediction."""
    run = difftools.load(converted)
    mf = ModelFn(run.model, run.process, run.prediction)
    b = io["cfg_x"].shape[0] // 2
    x, t, y, y_null = io["cfg_x"][:b], timesteps_to_t(io["cfg_t"][:b]), io["cfg_y"][:b], io["cfg_y"][b:]
    assert bool((y_null == run.model.null_class).all())
    ref = io["cfg_out"]
    with torch.no_grad():
        g = guided(mf, "cfg", float(io["cfg_scale"]), uncond={"y": y_null})
        eps = g.eps(x, t, y=y)
        assert g.nfe == 1  # one batched network call for both halves
        cond, uncond = mf.eps(x, t, y=y), mf.eps(x, t, y=y_null)
    for half in (ref[:b], ref[b:]):  # both halves of the reference carry the same guided eps
        assert max_diff(eps[:, :3], half[:, :3]) < ATOL
    assert max_diff(cond[:, 3], ref[:b, 3]) < ATOL and max_diff(uncond[:, 3], ref[b:, 3]) < ATOL
    # and guiding all 4 channels (ours) differs from the reference exactly in channel 3
    assert max_diff(eps[:, 3], ref[:b, 3]) > 1e-2


def test_pos_embed_is_checked_not_copied(tmp_path, ref_cfg):
    state = load_file(str(WEIGHTS))
    model = idit.model_from_reference(state, ref_cfg, source="ref")
    assert "pos_embed" not in model.state_dict()
    assert max_diff(model.pos_embed, state["pos_embed"]) == 0.0
    state["pos_embed"] = state["pos_embed"] + 0.01 * torch.randn_like(state["pos_embed"])
    with pytest.raises(
        ConversionError, match=r"pos_embed differs from the fixed 2-D sin-cos table of a 4x4 grid"
    ):
        idit.model_from_reference(state, ref_cfg, source="ref")


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, ref_cfg):
    state = load_file(str(WEIGHTS))
    del state["blocks.2.attn.qkv.weight"], state["final_layer.linear.bias"]
    state["blocks.3.attn.qkv.weight"] = torch.zeros(288, 96)
    state["t_embedder.mlp.0.weight"] = torch.zeros(96, 128)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ConversionError) as err:
        idit.convert(bad, CONFIG, tmp_path / "out")
    msg = str(err.value)
    assert str(bad) in msg and "facebookresearch/DiT layout" in msg
    assert "missing keys (2): blocks.2.attn.qkv.weight; final_layer.linear.bias" in msg
    assert "unexpected keys (1): blocks.3.attn.qkv.weight" in msg
    assert "t_embedder.mlp.0.weight: (96, 128) in the file, (96, 256) expected" in msg
    assert not (tmp_path / "out").exists()  # nothing written


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path, ref_cfg):
    with pytest.raises(
        ConversionError,
        match=r"y_embedder\.embedding_table\.weight: \(11, 96\) in the file, "
        r"\(21, 96\) expected.*Check --config",
    ):
        idit.convert(WEIGHTS, {**ref_cfg, "num_classes": 20}, tmp_path / "a")
    with pytest.raises(
        ConversionError, match=r"final_layer\.linear\.weight: \(32, 96\) in the file, \(16, 96\)"
    ):
        idit.convert(WEIGHTS, {**ref_cfg, "learn_sigma": False}, tmp_path / "b")
    with pytest.raises(ConversionError, match=r"unknown DiT constructor arguments \['num_head'\]"):
        idit.convert(WEIGHTS, {**ref_cfg, "num_head": 3}, tmp_path / "c")
    with pytest.raises(ConversionError, match="unknown DiT model 'DiT-XXL/2'"):
        idit.reference_config("DiT-XXL/2")


def test_model_names_resolve_to_reference_sizes():
    cfg = idit.reference_config("DiT-XL/2", input_size=64)
    assert cfg == {**idit.REFERENCE_DEFAULTS, "input_size": 64}
    assert idit.reference_config("SiT-B/4", family="SiT") == {
        **idit.REFERENCE_DEFAULTS,
        "hidden_size": 768,
        "depth": 12,
        "num_heads": 12,
        "patch_size": 4,
    }


def test_training_checkpoint_pickle_picks_ema_and_runs_no_code(tmp_path, ref_cfg, io):
    state = load_file(str(WEIGHTS))
    raw = {k: v + 1.0 for k, v in state.items() if k != "pos_embed"} | {"pos_embed": state["pos_embed"]}
    ckpt = {
        "model": raw,
        "ema": state,
        "opt": {"state": {}, "param_groups": []},
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256),
    }
    torch.save(ckpt, tmp_path / "0100000.pt")
    assert (
        max_diff(
            read_state_dict(tmp_path / "0100000.pt")["x_embedder.proj.bias"], state["x_embedder.proj.bias"]
        )
        == 0
    )
    assert (
        max_diff(
            read_state_dict(tmp_path / "0100000.pt", "model")["x_embedder.proj.bias"],
            state["x_embedder.proj.bias"] + 1,
        )
        == 0
    )
    with pytest.raises(ConversionError, match=r"no state dict under 'opts'.*'args', 'ema', 'model', 'opt'"):
        read_state_dict(tmp_path / "0100000.pt", "opts")

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"ema": Payload()}, f, protocol=2)
    with pytest.raises(ConversionError, match="without running code"):
        read_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_model_without_label_dropout_gets_a_zero_null_row(tmp_path, ref_cfg, caplog):
    state = load_file(str(WEIGHTS))
    state["y_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"][:10].clone()
    with caplog.at_level(logging.WARNING, logger="difftools.interop"):
        model = idit.model_from_reference(state, {**ref_cfg, "class_dropout_prob": 0.0}, source="nodrop")
    assert "no null class" in caplog.text
    table = model.y_embedder.embedding_table.weight
    assert table.shape == (11, 96) and bool((table[10] == 0).all())
    assert torch.equal(table[:10], state["y_embedder.embedding_table.weight"])


def test_out_directory_with_other_files_is_never_replaced(tmp_path, converted):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(ConversionError, match="not a difftools checkpoint.*refusing to replace it"):
        idit.convert(WEIGHTS, CONFIG, keep)
    assert (keep / "notes.txt").read_text() == "precious"
    out = idit.convert(WEIGHTS, CONFIG, tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="already holds a difftools checkpoint; pass --overwrite"):
        idit.convert(WEIGHTS, CONFIG, out)
    assert idit.convert(WEIGHTS, CONFIG, out, drop_sigma=True, overwrite=True) == out
    assert not difftools.load(out).model.learn_sigma


def test_latent_autoencoder_is_recorded(tmp_path):
    from diffusers import AutoencoderKL

    from difftools.models.vae import DiffusersKLAutoencoder, build_autoencoder

    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae")
    ae = build_autoencoder("kl", path=tmp_path / "vae", scale=0.18215)
    run = difftools.load(idit.convert(WEIGHTS, CONFIG, tmp_path / "ckpt", autoencoder=ae))
    assert isinstance(run.autoencoder, DiffusersKLAutoencoder)
    assert run.autoencoder.scale == 0.18215 and run.autoencoder.path == str(tmp_path / "vae")


# ------------------------------------------------------------------------------ SiT
@pytest.fixture(scope="module")
def sit_raw(ref_cfg):
    """SiT's network on the same weights (SiT = DiT's architecture): embeds SiT's own s, no sign change."""
    return idit.model_from_reference(
        load_file(str(WEIGHTS)), ref_cfg, source="sit", time_scale=1.0, time_shift=0.0
    )


def test_sit_velocity_is_minus_sits_with_time_flipped(tmp_path, io, sit_raw):
    run = difftools.load(isit.convert(WEIGHTS, CONFIG, tmp_path / "sit"))
    assert isinstance(run.process, Flow) and run.prediction == "flow"
    mf = ModelFn(run.model, run.process, run.prediction)
    t = torch.tensor([0.05, 0.3, 0.7, 0.98])
    x, y = io["x"], io["y"]
    with torch.no_grad():
        ours = mf.output(x, t, y=y)
        v_sit = sit_raw(x, 1 - t, y)  # SiT's velocity dx/ds = data - noise at s = 1 - t
        assert max_diff(ours, -v_sit) < 1e-6
        # x0 from SiT's path: x_s = s d + (1 - s) n, v = d - n  =>  d = x_s + (1 - s) v
        s = (1 - t).view(-1, 1, 1, 1)
        assert max_diff(mf.x0(x, t, y=y), x + (1 - s) * v_sit) < ATOL
        # and eps = n = x_s - s v
        assert max_diff(mf.eps(x, t, y=y), x - s * v_sit) < ATOL


def test_sit_at_data_end_matches_the_reference_network(tmp_path, io):
    """SiT embeds s itself; at s = 1 (our t = 0) that is DiT's timestep 1, the reference's first sample."""
    assert float(io["t"][0]) == 1.0
    run = difftools.load(isit.convert(WEIGHTS, CONFIG, tmp_path / "sit"))
    with torch.no_grad():
        v = ModelFn(run.model, run.process, run.prediction).output(io["x"][:1], 0.0, y=io["y"][:1])
    assert max_diff(v, -io["out"][:1, :4]) < ATOL


def test_sit_noise_prediction_is_eps_without_sign_change(tmp_path, io, sit_raw):
    run = difftools.load(isit.convert(WEIGHTS, CONFIG, tmp_path / "sit", prediction="noise"))
    assert run.prediction == "eps" and isinstance(run.process, Flow)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    with torch.no_grad():
        eps = ModelFn(run.model, run.process, run.prediction).eps(io["x"], t, y=io["y"])
        assert max_diff(eps, sit_raw(io["x"], 1 - t, io["y"])) < 1e-6
    with pytest.raises(ConversionError, match="SiT prediction 'score' cannot be converted"):
        isit.convert(WEIGHTS, CONFIG, tmp_path / "score", prediction="score")


# ------------------------------------------------------------------------------ diffusers
def _diffusers_dit(seed=0, out_channels=8, norm_eps=1e-5, **kw):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(
        num_attention_heads=3,
        attention_head_dim=16,
        in_channels=4,
        out_channels=out_channels,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=norm_eps,
        **kw,
    )
    shared = {}
    with (
        torch.no_grad()
    ):  # perturb every weight; the per-block embedders stay copies of block 0's, as trained
        for name, p in net.named_parameters():
            key = name.split("norm1.emb.", 1)[-1] if "norm1.emb." in name else None
            if key is not None and key in shared:
                p.copy_(shared[key])
                continue
            p.add_(0.05 * torch.randn_like(p))
            if key is not None:
                shared[key] = p.detach().clone()
    return net.eval()


def _pipeline_folder(path: Path, net, scheduler) -> Path:
    net.save_pretrained(path / "transformer")
    scheduler.save_pretrained(path / "scheduler")
    return path


def _inputs(seed=1, b=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([3, 10, 0, 9])


@pytest.mark.parametrize(
    "flow,options",
    [(False, {}), (True, dict(norm_eps=0.1, attention_bias=False))],  # large eps: mlp_norm_eps follows it
    ids=["ddpm", "flow_match-no_attention_bias"],
)
def test_diffusers_import_matches_diffusers_through_the_adapter(tmp_path, flow, options):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    net = _diffusers_dit(**options)
    sched = FlowMatchEulerDiscreteScheduler() if flow else DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    run = difftools.load(idiff.convert(_pipeline_folder(tmp_path / "pipe", net, sched), tmp_path / "ckpt"))
    assert isinstance(run.process, Flow if flow else DiscreteVP)
    assert run.prediction == ("flow" if flow else "eps")
    ours, theirs = ModelFn(run.model, run.process, run.prediction), from_diffusers(net, sched)
    x, y = _inputs()
    with torch.no_grad():
        for t in (torch.tensor([0.001, 0.25, 0.6, 1.0]), 0.5):
            a, b = ours.output(x, t, y=y), theirs.output(x, t, y=y)
            assert max_diff(a, b) < ATOL and max_diff(a, 0 * a) > 0.1
            # x0 = (x - sigma eps) / alpha grows to ~1e4 where alpha -> 0: compare relative to its size
            torch.testing.assert_close(ours.x0(x, t, y=y), theirs.x0(x, t, y=y), rtol=1e-4, atol=1e-4)


def test_diffusers_round_trip_is_exact(tmp_path):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    net = _diffusers_dit(seed=3)
    pipe = _pipeline_folder(tmp_path / "pipe", net, DDPMScheduler(variance_type="learned_range"))
    ckpt = idiff.convert(pipe, tmp_path / "ckpt")
    exported = idiff.export(ckpt, tmp_path / "back")
    again = DiTTransformer2DModel.from_pretrained(exported / "transformer")
    public = [k for k in net.config if not k.startswith("_")]
    assert {k: again.config[k] for k in public} == {k: net.config[k] for k in public}
    a, b = net.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    sched = DDPMScheduler.from_pretrained(exported / "scheduler")
    assert sched.config.variance_type == "learned_range" and sched.config.prediction_type == "epsilon"
    torch.testing.assert_close(sched.alphas_cumprod, DDPMScheduler().alphas_cumprod, rtol=0, atol=1e-6)


def test_export_to_diffusers_gives_the_same_outputs(tmp_path):
    """A DiT in diffusers' conventions (as an imported one is) exports exactly; the diffusers network,
    its scheduler and the adapter reproduce our ModelFn."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    model = DiT(
        input_size=8,
        in_channels=4,
        patch_size=2,
        hidden_size=48,
        depth=2,
        num_heads=3,
        num_classes=10,
        learn_sigma=True,
        return_sigma=False,
        time_shift=-1.0,
        time_freq_shift=1,
        mlp_norm_eps=1e-5,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    process = idit.diffusion_process()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, process=process, prediction="eps", update_latest=False)
    out = idiff.export(ckpt, tmp_path / "diffusers")
    net = DiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    assert (sched.config.beta_schedule, sched.config.beta_start, sched.config.beta_end) == (
        "linear",
        1e-4,
        0.02,
    )
    x, y = _inputs(2)
    k = torch.tensor([0, 249, 500, 999])
    full = DiT(**{**model.config(), "return_sigma": True})
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        theirs = net(x, timestep=k, class_labels=y).sample
        assert theirs.shape == (4, 8, 8, 8)
        assert max_diff(full.eval()(x, timesteps_to_t(k).float(), y), theirs) < ATOL
        mine = ModelFn(model.eval(), process, "eps")
        assert (
            max_diff(
                mine.eps(x, timesteps_to_t(k), y=y), from_diffusers(net, sched).eps(x, timesteps_to_t(k), y=y)
            )
            < ATOL
        )


def test_reference_dit_exports_only_approximately(tmp_path, converted, io):
    with pytest.raises(
        ConversionError,
        match=r"10000\^\(-k/128\).*downscale_freq_shift=1.*10000\^\(-k/127\).*"
        r"--approximate-time-embedding",
    ):
        idiff.export(converted, tmp_path / "exact")
    assert not (tmp_path / "exact").exists()
    from diffusers import DiTTransformer2DModel

    out = idiff.export(converted, tmp_path / "approx", approximate_time_embedding=True)
    net = DiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    with torch.no_grad():
        deviation = max_diff(net(io["x"], timestep=io["t"], class_labels=io["y"]).sample, io["out"])
    assert 1e-4 < deviation < 0.5  # close, but not the reference: why the exact export refuses


def test_export_refuses_what_diffusers_cannot_hold(tmp_path):
    base = dict(
        input_size=8,
        in_channels=4,
        patch_size=2,
        hidden_size=48,
        depth=1,
        num_heads=3,
        time_shift=-1.0,
        time_freq_shift=1,
    )
    cases = [
        (dict(num_classes=0), "unconditional \\(num_classes=0\\)"),
        (dict(mlp_ratio=2.0), "mlp_ratio is 2.0"),
    ]
    for i, (kw, msg) in enumerate(cases):
        ckpt = save_checkpoint(
            tmp_path / f"c{i}",
            DiT(**{**base, **kw}),
            process=idit.diffusion_process(),
            prediction="eps",
            update_latest=False,
        )
        with pytest.raises(ConversionError, match=msg):
            idiff.export(ckpt, tmp_path / f"out{i}")
    # a continuous VP has no diffusers scheduler: refused, unless the network alone is wanted
    ckpt = save_checkpoint(
        tmp_path / "vp", DiT(**base), process=VP("cosine"), prediction="eps", update_latest=False
    )
    with pytest.raises(ConversionError, match=r"no diffusers scheduler .*VP\(cosine.*--transformer-only"):
        idiff.export(ckpt, tmp_path / "vp_out")
    out = idiff.export(ckpt, tmp_path / "vp_out", transformer_only=True)
    assert (out / "transformer" / "config.json").is_file() and not (out / "scheduler").exists()


def test_diffusers_import_refuses_blocks_with_different_embedders(tmp_path):
    from diffusers import DDPMScheduler

    net = _diffusers_dit()
    with torch.no_grad():
        net.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias.add_(0.1)
    pipe = _pipeline_folder(tmp_path / "pipe", net, DDPMScheduler())
    with pytest.raises(
        ConversionError,
        match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_2\.bias "
        r"differs from block 0's copy \(max \|diff\| 0\.1\)",
    ):
        idiff.convert(pipe, tmp_path / "ckpt")


def test_diffusers_import_needs_a_scheduler_and_reads_sharded_weights(tmp_path):
    from diffusers import DDPMScheduler

    net = _diffusers_dit(out_channels=4)
    net.save_pretrained(tmp_path / "t", max_shard_size="100KB")
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    with pytest.raises(ConversionError, match=r"no scheduler config next to .*pass --scheduler PATH"):
        idiff.convert(tmp_path / "t", tmp_path / "ckpt")
    DDPMScheduler().save_pretrained(tmp_path / "s")
    run = difftools.load(idiff.convert(tmp_path / "t", tmp_path / "ckpt", scheduler=tmp_path / "s"))
    x, y = _inputs()
    with torch.no_grad():
        t = torch.tensor([0.1, 0.2, 0.3, 0.4])
        assert (
            max_diff(
                ModelFn(run.model, run.process, "eps").eps(x, t, y=y),
                from_diffusers(net, DDPMScheduler()).eps(x, t, y=y),
            )
            < ATOL
        )


# ------------------------------------------------------------------------------ command line
def test_command_line_converts_and_exports(tmp_path, io):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = f"--from dit --weights {WEIGHTS} --config {CONFIG} --out {tmp_path / 'ckpt'} --drop-sigma"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert.py"), *args.split(), "--max-shard-size", "50KB"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "ema.safetensors.index.json").is_file()  # sharded above 50KB
    run = difftools.load(tmp_path / "ckpt")
    with torch.no_grad():
        eps = ModelFn(run.model, run.process, run.prediction).eps(io["x"], timesteps_to_t(io["t"]), y=io["y"])
    assert max_diff(eps, io["out"][:, :4]) < ATOL
    # the error path, in-process (a second interpreter would re-import everything): clean exit, no traceback
    spec = importlib.util.spec_from_file_location("convert_script", REPO / "scripts" / "convert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_:
        script.main(f"--to diffusers --checkpoint {tmp_path / 'ckpt'} --out {tmp_path / 'x'}".split())
    assert str(exit_.value).startswith("error: cannot export this DiT as a diffusers DiTTransformer2DModel")
    assert not (tmp_path / "x").exists()
