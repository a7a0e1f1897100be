"""One diffusion training step, timed: the rows of ``scripts/bench_train.py``.

A row (:class:`Combo`) is an implementation (difftools' DiT, or facebookresearch/DiT's imported from a
folder, :mod:`.reference_dit`), a preset, an input (latent 4 channels or pixel 3 channels), an
attention backend, eager or ``torch.compile``, a speed :class:`Variant` and a batch size.
:func:`build_step` makes the step a real training step on random data held on the device (bf16
autocast forward + loss, backward, AdamW step, ``zero_grad(set_to_none)``, and with
``StepConfig.ema`` the EMA update each implementation's training loop does: ours
:class:`~difftools.training.ema.EMA` (one fused ``_foreach_lerp_``), the reference's ``update_ema`` of
its train.py (a ``mul_`` and an ``add_`` per parameter)); :func:`run_combo` warms it up, times it and
returns a :class:`Row` with images/s, step time, peak memory and MFU = 3 * forward FLOPs/image *
images/s / :data:`PEAK_TFLOPS` (backward = 2x forward).
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

from difftools.benchmark.profiling import profile_steps as profile_steps_of
from difftools.benchmark.profiling import sync
from difftools.losses import DenoisingLoss
from difftools.models.dit import DiT, parse_preset
from difftools.nn.fp8 import float8_token_gemms
from difftools.process import Flow
from difftools.training.ema import EMA

PEAK_TFLOPS = 790.0  # H100 dense bf16 matmul peak as measured (ARCHITECTURE.md)
LOSS_NAME = "difftools.losses.DenoisingLoss(Flow(), 'flow')"


# --------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """A speed option of our training step; ``default`` is the configuration the trainer uses."""

    about: str
    model_kw: dict = field(default_factory=dict)  # extra DiT constructor arguments
    compile_mode: str | None = None  # torch.compile(mode=...)
    inductor: dict = field(default_factory=dict)  # torch._inductor.config overrides
    fullstep: bool = False  # compile noise sampling + model + loss as one graph, not only the model
    optcompile: bool = False  # torch.compile(opt.step) on foreach AdamW instead of fused AdamW
    fp8: str | None = None  # float8 recipe of the blocks' token GEMMs (difftools.nn.fp8; trainer.fp8)


VARIANTS: dict[str, Variant] = {
    "default": Variant("as shipped: fused adaLN Triton kernels (norm_kernels=auto), fp32 residual stream, "
                       "torch.compile(model), fused AdamW"),
    "torchnorm": Variant("DiT(norm_kernels='torch'): residual/norm/modulation as plain ops (what inductor "
                         "fuses by itself; the default before the fused kernels)",
                         model_kw={"norm_kernels": "torch"}),
    "lowp": Variant(
        "DiT(lowp_residual=True): bf16 residual stream between blocks (opt-in, changes rounding)",
        model_kw={"lowp_residual": True},
    ),
    "cdtune": Variant(
        "inductor coordinate_descent_tuning: benchmarks block sizes of the fused Triton kernels",
        inductor={"coordinate_descent_tuning": True},
    ),
    "autotune": Variant(
        "mode max-autotune-no-cudagraphs: GEMMs autotuned against Triton templates (epilogue fusion)",
        compile_mode="max-autotune-no-cudagraphs",
    ),
    "cudagraphs": Variant("mode reduce-overhead: forward and backward replayed as CUDA graphs",
                          compile_mode="reduce-overhead"),
    "fullstep": Variant("one graph for t/eps sampling, x_t, model and MSE (not only the model)",
                        fullstep=True),
    "optcompile": Variant("torch.compile(opt.step) on foreach AdamW instead of the fused AdamW kernel",
                          optcompile=True),
    "fp8": Variant("torchao float8 training of the blocks' token GEMMs (attn.qkv/proj, mlp.fc1/fc2), "
                   "tensorwise scales (trainer.fp8=tensorwise)", fp8="tensorwise"),
    "fp8row": Variant("torchao float8 training of the blocks' token GEMMs, rowwise scales "
                      "(trainer.fp8=rowwise)", fp8="rowwise"),
}
NEEDS_INDUCTOR = ("cdtune", "autotune", "cudagraphs")


def resolve_variant(spec: str) -> Variant:
    """'lowp+cdtune' -> the merged Variant (names from VARIANTS joined by '+')."""
    names = [n for n in spec.split("+") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant {spec!r}; choose from {', '.join(VARIANTS)} (join with '+')")
    parts = [VARIANTS[n] for n in names]
    modes = {p.compile_mode for p in parts if p.compile_mode}
    if len(modes) > 1:
        raise ValueError(f"variant {spec!r} asks for two compile modes: {sorted(modes)}")
    recipes = {p.fp8 for p in parts if p.fp8}
    if len(recipes) > 1:
        raise ValueError(f"variant {spec!r} asks for two float8 recipes: {sorted(recipes)}")
    merged = Variant(" + ".join(p.about for p in parts))
    return replace(
        merged,
        model_kw={k: v for p in parts for k, v in p.model_kw.items()},
        compile_mode=next(iter(modes), None),
        inductor={k: v for p in parts for k, v in p.inductor.items()},
        fullstep=any(p.fullstep for p in parts),
        optcompile=any(p.optcompile for p in parts),
        fp8=next(iter(recipes), None),
    )


# ------------------------------------------------------------------------------------- rows
@dataclass
class Combo:
    impl: str  # "difftools" | "reference"
    model: str  # preset, e.g. "DiT-B/2"
    input: str  # "latent" | "pixel"
    backend: str  # attention backend ("timm" for the reference)
    mode: str  # "eager" | "compile"
    variant: str = "default"
    batch: int = 0  # 0: StepConfig.batch

    def key(self) -> str:
        key = f"{self.impl} {self.model} {self.input} {self.backend} {self.mode} {self.variant}"
        return key + (f" b{self.batch}" if self.batch else "")


@dataclass
class Row:
    combo: Combo
    status: str = "ok"
    images_per_s: float | None = None
    step_ms: float | None = None
    peak_gb: float | None = None
    mfu: float | None = None
    compile_s: float | None = None  # cold compile in a precompile worker
    warmup_s: float | None = None
    gflops_fwd: float | None = None
    loss: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepConfig:
    """What every row shares: batch, input size, the depth override (smoke tests), the compile
    backend, and how many warm-up and timed steps."""

    batch: int = 256
    image_size: int = 32
    depth: int | None = None
    compile_backend: str = "inductor"
    warmup: int = 3
    steps: int = 15
    ema: bool = True


def batch_of(combo: Combo, cfg: StepConfig) -> int:
    return combo.batch or cfg.batch


def make_loss() -> DenoisingLoss:
    """Our loss in every difftools row: flow matching (arXiv 2210.02747)."""
    return DenoisingLoss(Flow(), prediction="flow")


# ---------------------------------------------------------------------------------- timing
def setup_torch(device: torch.device) -> None:
    """Process-wide settings; workers and the timed pass must agree (they are part of cache keys)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # CPU runs are smoke tests on a shared machine
    inductor_config.fx_graph_cache = True  # reuse the workers' compiled graphs from disk
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True  # and skip AOTAutograd's joint tracing too


def arch(combo: Combo, cfg: StepConfig) -> tuple[int, int, int, int]:
    """(hidden_size, depth, num_heads, patch_size) of the preset; ``cfg.depth`` overrides the depth."""
    hidden, depth, heads, patch = parse_preset(combo.model)
    return hidden, cfg.depth or depth, heads, patch


def build_step(combo: Combo, cfg: StepConfig, device, loss_fn, reference):
    """Model, optimizer and a closure doing one full training step; returns (step, fwd FLOPs/image, objs)."""
    variant = resolve_variant(combo.variant)
    channels = 4 if combo.input == "latent" else 3
    size, batch = cfg.image_size, batch_of(combo, cfg)
    hidden, depth, heads, patch = arch(combo, cfg)
    sizes = dict(input_size=size, patch_size=patch, in_channels=channels, hidden_size=hidden, depth=depth,
                 num_heads=heads, num_classes=10)
    if combo.impl == "difftools":
        model = DiT(**sizes, attn_backend=combo.backend, **variant.model_kw).to(device)
        flops = model.flops_per_image()  # fp8 rows: the same FLOPs, so MFU stays the bf16-peak fraction
        if variant.fp8:
            float8_token_gemms(model, variant.fp8)  # before compile, as the trainer does
    else:
        ref_models, create_diffusion = reference
        # their DiT class with the preset's sizes (their DiT_models table lacks our DiT-T)
        model = ref_models.DiT(**sizes, learn_sigma=True).to(device)
        with torch.device("meta"):  # same architecture in our class, only to count its FLOPs
            flops = DiT(**sizes, learn_sigma=True).flops_per_image()
        diffusion = create_diffusion(timestep_respacing="")
    model.train()
    compiled = combo.mode == "compile"
    compile_kw = dict(backend=cfg.compile_backend)
    if variant.compile_mode:
        compile_kw["mode"] = variant.compile_mode
    fn = torch.compile(model, **compile_kw) if compiled and not variant.fullstep else model
    if variant.optcompile:
        # foreach AdamW traced into one graph: inductor emits a few fused Triton kernels for the update
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
        opt_step = torch.compile(opt.step, backend=cfg.compile_backend)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
        opt_step = opt.step
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    use_amp = device.type == "cuda"

    def forward_loss(x, y):
        if combo.impl == "difftools":
            return loss_fn(fn, x, y)[0]
        # the reference's train.py step: integer timesteps, its training_losses
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return diffusion.training_losses(fn, x, t, dict(y=y))["loss"].mean()

    fwd = torch.compile(forward_loss, **compile_kw) if compiled and variant.fullstep else forward_loss
    mark_step = variant.compile_mode == "reduce-overhead"
    ema_update = make_ema_update(combo, model) if cfg.ema else None

    def step():
        if mark_step:  # CUDA-graph trees: outputs of the previous replay may now be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = fwd(x, y)
        loss.backward()
        opt_step()
        opt.zero_grad(set_to_none=True)
        if ema_update is not None:
            ema_update()
        return loss.detach()

    return step, flops, (model, fn, opt, ema_update)


def make_ema_update(combo: Combo, model: torch.nn.Module):
    """The EMA update of each implementation's own training loop (decay 0.9999): ours
    :class:`~difftools.training.ema.EMA` (``_foreach_lerp_`` over all tensors); the reference's
    train.py ``update_ema`` (for every parameter ``ema.mul_(decay).add_(param, alpha=1 - decay)``),
    written out here as it does it."""
    if combo.impl == "difftools":
        ema = EMA(model, 0.9999, warmup=False)
        return lambda: ema.update(model)
    shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update_like_reference(decay: float = 0.9999):
        for name, param in model.named_parameters():
            shadow[name].mul_(decay).add_(param.data, alpha=1 - decay)

    return update_like_reference


def inductor_patch(combo: Combo, cfg: StepConfig):
    """torch._inductor.config overrides of the combo's variant (active while it compiles and runs)."""
    overrides = resolve_variant(combo.variant).inductor
    if not overrides or cfg.compile_backend != "inductor":
        return contextlib.nullcontext()
    return inductor_config.patch(overrides)


def run_combo(combo: Combo, cfg: StepConfig, device, loss_fn, reference, profile_steps: int = 0,
              profile_dir: Path | None = None) -> Row:
    """Build, warm up and time one row; ``profile_steps`` > 0 also profiles it (kernel time by
    category, the top kernels written to ``profile_dir``). Any failure becomes the row's status."""
    row = Row(combo)
    objs = None
    counters.clear()
    try:
        with inductor_patch(combo, cfg):
            step, flops, objs = build_step(combo, cfg, device, loss_fn, reference)
            row.gflops_fwd = flops / 1e9
            t0 = time.perf_counter()
            for _ in range(cfg.warmup):  # includes compilation and the attention 'auto' probe
                step()
            sync(device)
            row.warmup_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                loss = step()
            if device.type == "cuda":
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end) / cfg.steps
                row.peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
            else:
                ms = (time.perf_counter() - t0) * 1000 / cfg.steps
            row.loss = float(loss)  # the only host sync of the timed loop, after it
            if not math.isfinite(row.loss):
                row.status, row.note = "error", f"non-finite loss {row.loss}"
            row.step_ms = ms
            row.images_per_s = batch_of(combo, cfg) * 1000 / ms
            row.mfu = 3 * flops * row.images_per_s / (PEAK_TFLOPS * 1e12)
            if profile_steps > 0:
                try:  # a profiler failure (e.g. no CUPTI) must not cost the timed row
                    row.extra["profile"] = profile_steps_of(step, device, profile_steps, profile_dir,
                                                            combo.key())
                except Exception as err:
                    traceback.print_exc()
                    row.extra["profile_error"] = f"{type(err).__name__}: {err}"
    except torch.OutOfMemoryError:
        row.status, row.note = "OOM", f"out of memory at batch {batch_of(combo, cfg)}"
    except TimeoutError as err:
        row.status, row.note = "not run", f"stopped: {err}"
    except Exception as err:  # one broken combo must not cost the rest of the table
        traceback.print_exc()
        row.status, row.note = "error", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    finally:
        # cache hits show whether the precompile workers' artifacts were reused
        row.extra["compile_cache"] = {k: v for group in ("aot_autograd", "inductor")
                                      for k, v in counters[group].items() if "cache" in k}
        del objs
        gc.collect()
        torch._dynamo.reset()  # fresh compile caches: otherwise later models hit the recompile limit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


class Deadline:
    """SIGALRM at the time limit: a row still running then is stopped and listed as not run."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def _fire(self, signum, frame):
        raise TimeoutError("time limit reached")

    def __enter__(self):
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, max(0.01, self.deadline - time.perf_counter()))
        return self

    def __exit__(self, *exc):
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        return False
