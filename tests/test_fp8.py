"""Float8 training of the DiT blocks' token GEMMs (difftools.nn.fp8, trainer.fp8, the bench variants).

Runs on CPU: torch's CPU ``_scaled_mm`` executes the same torchao code path (e4m3/e5m2 casts, scales,
scaled matmul) as the GPU, only slowly, so conversion, numerics, the trainer and checkpoints are
checked here. The speed, and the compiled step on fp8 tensor cores, need a GPU (the ``cuda`` test and
docs/benchmarks.md section 6)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from accelerate.state import AcceleratorState

import difftools
from difftools import checkpoint as ckpt_io
from difftools.config import ConfigError
from difftools.data import build_dataset
from difftools.data.base import ArrayDataset
from difftools.losses import DenoisingLoss
from difftools.models.dit import DiT
from difftools.models.precond import apply_precond
from difftools.nn.fp8 import (
    TOKEN_GEMMS,
    Float8Unavailable,
    float8_token_gemms,
    require_float8_device,
    token_gemm_names,
)
from difftools.process import EDM, Flow
from difftools.training import DenoisingObjective, Trainer, TrainerConfig

pytest.importorskip("torchao.float8", reason="torchao (the fp8 extra, in dev) is not installed")

REPO = Path(__file__).resolve().parents[1]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(autouse=True)
def _isolated(isolated_engine):
    """Every test of this file runs isolated (tests/conftest.py)."""


def small_dit(depth: int = 3, hidden: int = 32, seed: int = 0, live: bool = False) -> DiT:
    """A tiny DiT (hidden 32: Linears 32->96, 32->32, 32->128, 128->32, all multiples of 16).
    ``live``: the adaLN-Zero and final Linears drawn at random instead of zero, so that every block
    and the output depend on the token GEMMs (at initialisation the blocks are the identity and the
    output is exactly 0, whatever the matmuls compute)."""
    torch.manual_seed(seed)
    model = DiT(input_size=16, in_channels=4, patch_size=2, hidden_size=hidden, depth=depth, num_heads=2,
                num_classes=10)
    if live:
        with torch.no_grad():
            for block in model.blocks:
                nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.3)
            nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.1)
            nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    return model


def is_float8(module: nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------------- which layers
def test_converts_exactly_the_four_token_gemms_of_every_block():
    model = small_dit(depth=3)
    linears_before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = float8_token_gemms(model, "tensorwise")
    expected = [f"blocks.{i}.{g}" for i in range(3) for g in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert names == expected and len(names) == 4 * model.depth
    converted = {n for n, m in model.named_modules() if is_float8(m)}
    assert converted == set(expected)
    untouched = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    # the Linears whose M is the batch (adaLN, timestep MLP) and the final projection stay plain
    assert untouched == linears_before - set(expected)
    assert untouched == {*(f"blocks.{i}.adaLN_modulation.1" for i in range(3)), "t_embedder.mlp.0",
                         "t_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1"}
    assert type(model.x_embedder.proj) is nn.Conv2d  # the patch embedding is a convolution, untouched


def test_looks_through_a_wrapper_and_names_the_rows_of_a_preset():
    """EDM preconditioning wraps the DiT: its blocks are found under the wrapper's attribute; DiT-XL/2
    (built on the meta device: no memory) has 4 x 28 token GEMMs."""
    wrapped = apply_precond(small_dit(depth=2), "edm", EDM())
    names = float8_token_gemms(wrapped, "rowwise")
    assert len(names) == 8 and all(is_float8(wrapped.get_submodule(n)) for n in names)
    assert names[0].endswith("blocks.0.attn.qkv") and names[0] != "blocks.0.attn.qkv"
    with torch.device("meta"):
        xl = DiT(input_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16)
    assert len(token_gemm_names(xl)) == 112 and TOKEN_GEMMS == ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def test_state_dict_keys_shapes_and_values_are_unchanged():
    """Float8 training keeps the fp32 master weights: same parameter objects, same state dict, so an
    optimizer built before the conversion still updates the model and checkpoints do not change."""
    model = small_dit()
    plain = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    float8_token_gemms(model, "tensorwise")
    assert [id(p) for p in model.parameters()] == params_before
    got, want = model.state_dict(), plain.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype == torch.float32, key
        assert torch.equal(got[key], want[key]), key
    fresh = small_dit(seed=1)
    fresh.load_state_dict(got)  # strict: a converted model's weights load into a plain DiT
    assert all(torch.equal(fresh.state_dict()[k], got[k]) for k in got)


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_is_converted(monkeypatch):
    model = small_dit(depth=1)
    with pytest.raises(ValueError, match=re.escape("unknown float8 recipe 'fp16'; choose one of tensorwise, "
                                                   "rowwise")):
        float8_token_gemms(model, "fp16")
    odd = DiT(input_size=16, in_channels=4, patch_size=2, hidden_size=40, depth=2, num_heads=2)
    with pytest.raises(ValueError, match=re.escape("blocks.0.attn.qkv is Linear(40 -> 120): float8 matmuls "
                                                   "(torch._scaled_mm) need in and out features that are "
                                                   "multiples of 16")):
        float8_token_gemms(odd, "tensorwise")
    assert not any(is_float8(m) for m in odd.modules())  # nothing half-converted
    with pytest.raises(ValueError, match="Sequential has no transformer block with attn.qkv, attn.proj, "
                                         "mlp.fc1, mlp.fc2 Linears"):
        float8_token_gemms(nn.Sequential(nn.Linear(32, 32)), "tensorwise")
    float8_token_gemms(model, "tensorwise")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv is a Float8Linear, not a plain nn.Linear: was "
                                         "the model converted to float8 before"):
        float8_token_gemms(model, "rowwise")


def test_missing_torchao_names_the_extra(monkeypatch):
    model = small_dit(depth=1)
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(Float8Unavailable, match=re.escape("float8 training needs torchao")) as err:
        float8_token_gemms(model, "tensorwise")
    assert "pip install 'difftools[fp8]' (torchao>=0.17)" in str(err.value)
    assert not any(is_float8(m) for m in model.modules())
    objective, data = _objective_and_data(small_dit(depth=1))
    with pytest.raises(Float8Unavailable, match=re.escape("pip install 'difftools[fp8]'")):
        Trainer(objective, TrainerConfig(fp8="tensorwise", device="cpu"), None, dataset=data)


def test_device_check_says_plainly_what_is_missing(monkeypatch):
    with pytest.raises(Float8Unavailable, match=re.escape(
            "trainer.fp8='rowwise' needs a CUDA GPU with float8 tensor cores (compute capability >= 8.9: "
            "Ada, Hopper, Blackwell); this run is on cpu. Turn it off (null)")):
        require_float8_device(torch.device("cpu"), "trainer.fp8='rowwise'")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(Float8Unavailable, match=re.escape(
            "cuda:0 is NVIDIA A100-SXM4-80GB with compute capability 8.0")):
        require_float8_device("cuda:0", "trainer.fp8='tensorwise'")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    require_float8_device("cuda:0")  # Hopper: no error


# -------------------------------------------------------------------------------------- numerics
def _quantized(t: torch.Tensor, dtype: torch.dtype, dim: int | None = None,
               pow2: bool = False) -> torch.Tensor:
    """t cast to fp8 with the dynamic scale s = fp8_max / amax (per tensor, or per slice along ``dim``;
    ``pow2``: s rounded down to a power of two) and scaled back: what the fp8 operand represents."""
    fmax = torch.finfo(dtype).max
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    s = (fmax / amax.double().clamp(min=1e-12)).float()
    if pow2:
        s = torch.exp2(torch.floor(torch.log2(s)))
    return (t * s).clamp(-fmax, fmax).to(dtype).float() / s


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_a_converted_linear_computes_the_documented_products(recipe):
    """The module docstring's equations, written out independently: tensorwise y, dx, dW equal the
    products of the e4m3 (x, W) and e5m2 (gradient) operands to fp32 rounding; rowwise (per-row
    power-of-two scales, e4m3 gradients) to bf16 rounding, since torchao returns rowwise products in
    bf16 (<= 2^-9 relative per element). Both differ from the fp32 Linear by the fp8 rounding
    (~4 %), which is what makes the check meaningful: an e4m3 gradient in the tensorwise recipe, or
    tensor scales in the rowwise one, would miss by that much."""
    model = small_dit(depth=1)
    float8_token_gemms(model, recipe)
    lin = model.blocks[0].mlp.fc1  # 32 -> 128
    x = torch.randn(4, 8, 32, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    X, W, G = x.detach().reshape(-1, 32), lin.weight.detach(), g.reshape(-1, 128)
    if recipe == "tensorwise":
        want_y = _quantized(X, E4M3) @ _quantized(W, E4M3).T + lin.bias.detach()
        want_dx = _quantized(G, E5M2) @ _quantized(W, E4M3)
        want_dw = _quantized(G, E5M2).T @ _quantized(X, E4M3)
        tol = 1e-6
    else:  # scales per row of the contraction: x and g per token, W per output channel; dW per column
        want_y = _quantized(X, E4M3, -1, True) @ _quantized(W, E4M3, -1, True).T + lin.bias.detach()
        want_dx = _quantized(G, E4M3, -1, True) @ _quantized(W, E4M3, 0, True)
        want_dw = _quantized(G, E4M3, 0, True).T @ _quantized(X, E4M3, 0, True)
        tol = 4e-3
    assert rel(y.detach().reshape(-1, 128), want_y) < tol
    assert rel(x.grad.reshape(-1, 32), want_dx) < tol
    assert rel(lin.weight.grad, want_dw) < tol
    assert 0.01 < rel(y.detach().reshape(-1, 128), X @ W.T + lin.bias.detach()) < 0.08


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_dit_stays_close_to_fp32(recipe):
    """What the blocks add to the token stream (hidden after the last block minus the embedded input,
    which fp8 leaves alone), fp8 against fp32. Tolerance: an e4m3 operand carries a relative rounding
    error of up to 2^-4 per element (RMS ~2^-4 / sqrt(3) ~ 3.6 %), so a product of two such operands is
    off by ~5 % of its RMS, and the chain of 4 GEMMs per block through attention and GELU keeps that
    order. Measured: ~5 %. Bounds [1 %, 12 %] fail for a no-op conversion (~0) and for a wrong scale
    (errors of order 1)."""
    model = small_dit(depth=2, live=True).eval()
    x, t, y = torch.randn(8, 4, 16, 16), torch.rand(8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        start = model.x_embedder(x) + model.pos_embed
        _, h32 = model(x, t, y, return_hidden=2)
        fp8 = copy.deepcopy(model)
        float8_token_gemms(fp8, recipe)
        _, h8 = fp8(x, t, y, return_hidden=2)
    assert 0.01 < rel(h8 - start, h32 - start) < 0.12


def _one_step_losses(model: nn.Module, device: str, amp: bool, compile_model: bool) -> tuple[float, float]:
    """Loss before and after one AdamW step at lr 1e-2 (same data, noise and label dropout for every
    call: the dropout draws from the global RNG)."""
    torch.manual_seed(2)
    loss_fn = DenoisingLoss(Flow(), "flow", "logit_normal")
    model = model.to(device).train()
    fn = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(32, 4, 16, 16, generator=g, device=device)
    y = torch.randint(0, 10, (32,), generator=g, device=device)
    losses = []
    for _ in range(2):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(fn, x, y, generator=torch.Generator(device).manual_seed(1))[0]
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses[0], losses[1]


def _assert_step_matches(got: tuple[float, float], want: tuple[float, float], loss_tol: float,
                         decrease_tol: float) -> None:
    (g0, g1), (w0, w1) = got, want
    assert abs(g0 - w0) / w0 < loss_tol and abs(g1 - w1) / w1 < loss_tol, (got, want)
    assert w0 - w1 > 0.03 * w0  # the step moves the loss by far more than the tolerances
    assert abs((g0 - g1) - (w0 - w1)) / (w0 - w1) < decrease_tol, (got, want)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_one_training_step_matches_fp32_on_cpu(recipe):
    """Loss before and after one AdamW step, fp8 against fp32 (same weights, data and noise). The loss
    is a mean over 32 x 4 x 16 x 16 squared errors; the fp8 error of the prediction (a few % of the
    blocks' part, zero-mean) enters it at first order as 2 mean(residual x error), which averages
    down. Measured: losses within 5e-4 relative, the step's decrease (6.3 % of the loss) within 0.7 %
    of fp32's. Bounds: 3e-3 and 3 %; a conversion that broke the gradients (a wrong scale, a lost
    gradient path) moves the decrease by far more, and a no-op one gives exactly fp32's numbers."""
    plain = small_dit(depth=2, live=True)
    fp8 = copy.deepcopy(plain)
    float8_token_gemms(fp8, recipe)
    want = _one_step_losses(plain, "cpu", amp=False, compile_model=False)
    got = _one_step_losses(fp8, "cpu", amp=False, compile_model=False)
    _assert_step_matches(got, want, loss_tol=3e-3, decrease_tol=0.03)
    assert got != want  # the fp8 matmuls did run


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_fp8_step_matches_bf16_on_gpu(recipe):
    """The GPU counterpart: the compiled (inductor) fp8 step on fp8 tensor cores against the compiled
    bf16 step, bf16 autocast on both sides. Bounds wider than the CPU test's (1e-2 on the losses, 30 %
    on the step's decrease): the bf16 side rounds too, and the fp8 forward uses the GPU's fast fp8
    accumulation (torchao's default for the output product), which the CPU kernel does not have."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability >= 8.9 (fp8 tensor cores)")
    plain = small_dit(depth=2, hidden=64, live=True)
    fp8 = copy.deepcopy(plain)
    float8_token_gemms(fp8, recipe)
    want = _one_step_losses(plain, "cuda", amp=True, compile_model=True)
    got = _one_step_losses(fp8, "cuda", amp=True, compile_model=True)
    _assert_step_matches(got, want, loss_tol=1e-2, decrease_tol=0.3)


# ----------------------------------------------------------------------------------- the trainer
def _objective_and_data(model: nn.Module):
    full = build_dataset("digits", image_size=16)
    data = ArrayDataset(full.images[:64].clone(), full.labels[:64].clone(), full.info)
    objective = DenoisingObjective(model, DenoisingLoss(Flow(), "flow", "logit_normal"), Flow(), "flow",
                                   dataset_info=data.info)
    return objective, data


def _trainer(out, model, **kw) -> Trainer:
    opts = dict(batch_size=16, max_steps=4, lr=1e-3, warmup_steps=1, log_every=2, ckpt_every=2, keep_last=0,
                sample_every=0, sample_num=10, sample_steps=2, progress=False, tensorboard=False,
                ema_decay=0.9, device="cpu", fp8="tensorwise")
    opts.update(kw)
    objective, data = _objective_and_data(model)
    return Trainer(objective, TrainerConfig(**opts), out, dataset=data, run_config={"note": "fp8 test"})


def _digits_dit() -> DiT:
    torch.manual_seed(0)
    return DiT(input_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2,
               num_classes=10)


def test_trainer_refuses_fp8_on_cpu_before_writing_anything(tmp_path):
    with pytest.raises(Float8Unavailable, match=re.escape(
            "trainer.fp8='tensorwise' needs a CUDA GPU with float8 tensor cores (compute capability >= 8.9")):
        _trainer(tmp_path / "run", _digits_dit())
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=re.escape("trainer.fp8='e4m3' is not a float8 recipe; choose one of "
                                                   "tensorwise, rowwise or null (off)")):
        _trainer(tmp_path / "run", _digits_dit(), fp8="e4m3")


def test_trainer_config_validates_fp8():
    assert TrainerConfig.from_dict({"fp8": "rowwise"}).fp8 == "rowwise"
    assert TrainerConfig.from_dict({"fp8": None}).fp8 is None and TrainerConfig().fp8 is None
    with pytest.raises(ConfigError, match=re.escape(
            "trainer.fp8='fp16' is not a valid choice; expected one of None, 'tensorwise', 'rowwise'")):
        TrainerConfig.from_dict({"fp8": "fp16"})


def test_fp8_run_checkpoints_load_as_a_plain_dit_and_resume_exactly(tmp_path, monkeypatch):
    """The trainer with trainer.fp8 (the GPU check waived: the CPU runs the same torchao path):
    the blocks train through Float8Linear, previews use a plain copy, the checkpoint's weights have the
    plain DiT's keys and shapes, trainer.json records the recipe, ``difftools.load`` rebuilds an
    ordinary DiT from it, and resuming at step 2 reproduces the uninterrupted run's losses exactly."""
    import difftools.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "require_float8_device", lambda device, setting="": None)
    full = _trainer(tmp_path / "full", _digits_dit())
    result = full.train()
    assert sum(is_float8(m) for m in full.model.modules()) == 8
    assert not any(is_float8(m) for m in full.ema_model().modules())
    ckpt = tmp_path / "full" / "checkpoints" / "step_0000004"
    plain = _digits_dit().state_dict()
    weights = ckpt_io.load_weights(ckpt / "model.safetensors")
    assert sorted(weights) == sorted(plain) and all(weights[k].shape == plain[k].shape for k in plain)
    meta = json.loads((ckpt / "state" / "trainer.json").read_text())
    assert meta["trainer"]["fp8"] == "tensorwise"
    loaded = difftools.load(ckpt, use_ema=False)
    assert type(loaded.model) is DiT and not any(is_float8(m) for m in loaded.model.modules())
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, full.model.state_dict()[key]), key

    AcceleratorState._reset_state(reset_partial_state=True)
    first = _trainer(tmp_path / "part", _digits_dit(), max_steps=2)
    first.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = _trainer(tmp_path / "part", _digits_dit(), resume="auto")
    rest = resumed.train()
    assert rest.losses == result.losses[2:]


def test_cli_rejects_fp8_settings_it_cannot_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(REPO / "train" / "dit.py"), f"hydra.run.dir={tmp_path / 'run'}",
           "trainer.max_steps=1", "trainer.progress=false"]
    bad = subprocess.run(cmd + ["trainer.fp8=fp16"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2
    assert "trainer.fp8='fp16' is not a valid choice; expected one of None, 'tensorwise', 'rowwise'" \
        in bad.stderr
    cpu = subprocess.run(cmd + ["trainer.fp8=tensorwise"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert cpu.returncode == 2, cpu.stderr[-2000:]
    assert "error: trainer.fp8='tensorwise' needs a CUDA GPU with float8 tensor cores" in cpu.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
