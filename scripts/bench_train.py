#!/usr/bin/env python
"""Training-step throughput of difftools' DiT (and optionally facebookresearch/DiT) on one GPU.

One row per (implementation, model, input, attention backend, eager | torch.compile, variant):
images/s, step time, peak memory and MFU = 3 * forward FLOPs/image * images/s / 790 TFLOP/s (H100
dense bf16 peak as measured; backward = 2x forward). A step is a real diffusion training step on
random data held on the GPU: bf16 autocast forward + loss, backward, fused AdamW step,
zero_grad(set_to_none). Our loss: flow matching, ``difftools.losses.DenoisingLoss(Flow(), "flow")``.
Reference: its ``models.DiT`` with the preset's sizes (learn_sigma=True, as trained there) and
``create_diffusion("").training_losses`` (eps MSE + variational bound), timed with the same optimizer
and autocast. The reference code is imported from ``--reference DIR`` (a folder with its
``models.py`` and ``diffusion/``), never copied into this project.

Rows (most important first; once ``--time-limit-s`` would be exceeded the rest are listed as not
run, and the tables are rewritten after every row, so a killed run still leaves its results):

1. ours vs the reference, backend sdpa (theirs: timm's attention), on ``--models`` x ``--inputs`` x
   ``--modes`` (default: DiT-B/2, DiT-S/2; latent 32x32x4, pixel 32x32x3; eager, compile);
2. ``--backend-rows`` on the main model / input (default: xformers, cudnn, math eager; xformers
   compile);
3. ``--variants`` of our compiled main row (DiT-B/2 latent), side by side with ``default``, so a
   speed change is measured, not assumed (``VARIANTS`` below; combine with ``+``, e.g. lowp+cdtune).

Compile time is the bottleneck of such a table (~30 s per graph for DiT-B/2 against ~3 s of timing),
so on CUDA the compiled rows are first compiled by ``--precompile-workers`` parallel worker processes
(one compile + one step each) that fill inductor's on-disk FX-graph / AOTAutograd / Triton caches;
the timed pass then runs every row alone on the GPU, re-tracing with cache hits. The ``compile s``
column is that cold compile in a worker (sharing the CPU with the others); ``warmup s`` the
cache-hit compile plus warm-up steps of the timed pass. The main row is also profiled (kernel time
by category: GEMM, attention, Triton-fused elementwise, optimizer, GPU idle).

Full CUDA run (bounded at 7.5 minutes from process start by --time-limit-s 450):

    PYTHONPATH=/tmp/site:$PWD python scripts/bench_train.py --reference .gpu/ref_dit --out $OUT/bench_train

CPU smoke test (< 1 minute): ``python scripts/bench_train.py --smoke --out /tmp/bench_smoke``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

T_PROCESS = time.perf_counter()  # the time limit counts from here (before the slow imports)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from difftools.models.dit import DiT, parse_preset  # noqa: E402
from difftools.nn.attention import cudnn_attention_available, xformers_available  # noqa: E402

PEAK_TFLOPS = 790.0  # H100 dense bf16 matmul peak as measured (ARCHITECTURE.md)


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


VARIANTS: dict[str, Variant] = {
    "default": Variant("as shipped: fp32 residual stream, torch.compile(model), fused AdamW"),
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
    merged = Variant(" + ".join(p.about for p in parts))
    return replace(
        merged,
        model_kw={k: v for p in parts for k, v in p.model_kw.items()},
        compile_mode=next(iter(modes), None),
        inductor={k: v for p in parts for k, v in p.inductor.items()},
        fullstep=any(p.fullstep for p in parts),
        optcompile=any(p.optcompile for p in parts),
    )


@dataclass
class Combo:
    impl: str  # "difftools" | "reference"
    model: str  # preset, e.g. "DiT-B/2"
    input: str  # "latent" | "pixel"
    backend: str  # attention backend ("timm" for the reference)
    mode: str  # "eager" | "compile"
    variant: str = "default"

    def key(self) -> str:
        return f"{self.impl} {self.model} {self.input} {self.backend} {self.mode} {self.variant}"


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


# --------------------------------------------------------------------------------- losses
class LocalFlowLoss(nn.Module):
    """Flow matching (arXiv 2210.02747): x_t = (1-t) x0 + t eps, target eps - x0 (if H2's loss is absent)."""

    def forward(self, model, x0, y=None, generator=None):
        t = torch.rand(x0.shape[0], device=x0.device)
        eps = torch.randn_like(x0)
        tb = t.view(-1, 1, 1, 1)
        pred = model((1 - tb) * x0 + tb * eps, t, y)
        return (pred.float() - (eps - x0).float()).pow(2).mean(), {}


def make_loss() -> tuple[nn.Module, str]:
    try:
        from difftools.losses import DenoisingLoss
        from difftools.process import Flow
    except ImportError as err:
        return LocalFlowLoss(), f"local flow-matching MSE (difftools.losses not importable: {err})"
    return DenoisingLoss(Flow(), prediction="flow"), "difftools.losses.DenoisingLoss(Flow(), 'flow')"


def load_reference(folder: Path):
    """Import facebookresearch/DiT's models.py and diffusion/ from ``folder`` under private module names."""
    models_py, diffusion_init = folder / "models.py", folder / "diffusion" / "__init__.py"
    for path in (models_py, diffusion_init):
        if not path.is_file():
            raise FileNotFoundError(
                f"--reference {folder}: {path} not found. Put facebookresearch/DiT's models.py and its "
                "diffusion/ package there (e.g. git show HEAD:models.py > DIR/models.py from a clone)."
            )
    spec = importlib.util.spec_from_file_location("ref_dit_models", models_py)
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    spec = importlib.util.spec_from_file_location(
        "ref_dit_diffusion", diffusion_init, submodule_search_locations=[str(folder / "diffusion")]
    )
    diffusion = importlib.util.module_from_spec(spec)
    sys.modules["ref_dit_diffusion"] = diffusion  # its relative imports resolve through this name
    spec.loader.exec_module(diffusion)
    return models, diffusion.create_diffusion


# ---------------------------------------------------------------------------------- timing
def setup_torch(device: torch.device) -> None:
    """Process-wide settings; workers and the timed pass must agree (they are part of cache keys)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # CPU runs are smoke tests on a shared machine
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # reuse the workers' compiled graphs from disk
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True  # and skip AOTAutograd's joint tracing too


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def arch(combo: Combo, args) -> tuple[int, int, int, int]:
    """(hidden_size, depth, num_heads, patch_size) of the preset; ``--depth`` overrides the depth."""
    hidden, depth, heads, patch = parse_preset(combo.model)
    return hidden, args.depth or depth, heads, patch


def build_step(combo: Combo, args, device, loss_fn, reference):
    """Model, optimizer and a closure doing one full training step; returns (step, fwd FLOPs/image, objs)."""
    variant = resolve_variant(combo.variant)
    channels = 4 if combo.input == "latent" else 3
    size = args.image_size
    hidden, depth, heads, patch = arch(combo, args)
    sizes = dict(input_size=size, patch_size=patch, in_channels=channels, hidden_size=hidden, depth=depth,
                 num_heads=heads, num_classes=10)
    if combo.impl == "difftools":
        model = DiT(**sizes, attn_backend=combo.backend, **variant.model_kw).to(device)
        flops = model.flops_per_image()
    else:
        ref_models, create_diffusion = reference
        # their DiT class with the preset's sizes (their DiT_models table lacks our DiT-T)
        model = ref_models.DiT(**sizes, learn_sigma=True).to(device)
        with torch.device("meta"):  # same architecture in our class, only to count its FLOPs
            flops = DiT(**sizes, learn_sigma=True).flops_per_image()
        diffusion = create_diffusion(timestep_respacing="")
    model.train()
    compiled = combo.mode == "compile"
    compile_kw = dict(backend=args.compile_backend)
    if variant.compile_mode:
        compile_kw["mode"] = variant.compile_mode
    fn = torch.compile(model, **compile_kw) if compiled and not variant.fullstep else model
    if variant.optcompile:
        # foreach AdamW traced into one graph: inductor emits a few fused Triton kernels for the update
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
        opt_step = torch.compile(opt.step, backend=args.compile_backend)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
        opt_step = opt.step
    x = torch.randn(args.batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    use_amp = device.type == "cuda"

    def forward_loss(x, y):
        if combo.impl == "difftools":
            return loss_fn(fn, x, y)[0]
        # the reference's train.py step: integer timesteps, its training_losses
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return diffusion.training_losses(fn, x, t, dict(y=y))["loss"].mean()

    fwd = torch.compile(forward_loss, **compile_kw) if compiled and variant.fullstep else forward_loss
    mark_step = variant.compile_mode == "reduce-overhead"

    def step():
        if mark_step:  # CUDA-graph trees: outputs of the previous replay may now be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = fwd(x, y)
        loss.backward()
        opt_step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, flops, (model, fn, opt)


def inductor_patch(combo: Combo, args):
    """torch._inductor.config overrides of the combo's variant (active while it compiles and runs)."""
    overrides = resolve_variant(combo.variant).inductor
    if not overrides or args.compile_backend != "inductor":
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(overrides)


def categorize(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "attn", "cudnn", "xformers", "cutlass_sm90_mha")):
        return "attention"
    if any(s in n for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "matmul", "sm90_")):
        return "gemm"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if n.startswith("triton"):
        return "triton (fused elementwise / norms)"
    return "other (aten elementwise, copies)"


def profile_steps(step, device, n: int, out_dir: Path | None, label: str) -> dict:
    """Kernel time per step by category for ``n`` steps (GPU idle = wall - kernel time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync(device)
    wall_ms = (time.perf_counter() - t0) * 1000 / n
    want = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    per_kernel: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type != want:
            continue
        if device.type == "cpu" and evt.cpu_parent is not None:
            continue  # CPU: only top-level ops, so time is not counted twice
        per_kernel.setdefault(evt.name, []).append(evt.time_range.elapsed_us() / 1000)
    by_cat: dict[str, float] = {}
    for name, times in per_kernel.items():
        cat = categorize(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + sum(times) / n
    busy = sum(by_cat.values())
    summary = dict(
        label=label, steps=n, wall_ms_per_step=round(wall_ms, 2), kernel_ms_per_step=round(busy, 2),
        kernels_per_step=round(sum(len(t) for t in per_kernel.values()) / n, 1),
        by_category_ms={k: round(v, 2) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
    )
    if out_dir is not None:
        top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:40]
        lines = [f"{label}: {n} profiled steps, {wall_ms:.2f} ms/step wall (profiler overhead included), "
                 f"{busy:.2f} ms/step in kernels", "", f"{'ms/step':>8} {'calls':>6}  category / kernel"]
        lines += [f"{sum(t) / n:8.3f} {len(t) / n:6.1f}  {categorize(k)[:9]:9s} {k[:150]}" for k, t in top]
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "profile_main.txt").write_text("\n".join(lines) + "\n")
    return summary


def run_combo(combo: Combo, args, device, loss_fn, reference, profile: bool = False) -> Row:
    row = Row(combo)
    objs = None
    counters.clear()
    try:
        with inductor_patch(combo, args):
            step, flops, objs = build_step(combo, args, device, loss_fn, reference)
            row.gflops_fwd = flops / 1e9
            t0 = time.perf_counter()
            for _ in range(args.warmup):  # includes compilation and the attention 'auto' probe
                step()
            sync(device)
            row.warmup_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            if device.type == "cuda":
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end) / args.steps
                row.peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
            else:
                ms = (time.perf_counter() - t0) * 1000 / args.steps
            row.loss = float(loss)  # the only host sync of the timed loop, after it
            if not math.isfinite(row.loss):
                row.status, row.note = "error", f"non-finite loss {row.loss}"
            row.step_ms = ms
            row.images_per_s = args.batch * 1000 / ms
            row.mfu = 3 * flops * row.images_per_s / (PEAK_TFLOPS * 1e12)
            if profile:
                try:  # a profiler failure (e.g. no CUPTI) must not cost the timed row
                    row.extra["profile"] = profile_steps(step, device, args.profile_steps, args.out,
                                                         combo.key())
                except Exception as err:
                    traceback.print_exc()
                    row.extra["profile_error"] = f"{type(err).__name__}: {err}"
    except torch.OutOfMemoryError:
        row.status, row.note = "OOM", f"out of memory at batch {args.batch}"
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


# ------------------------------------------------------------------- parallel precompilation
def worker_main(args) -> None:
    """Precompile worker: compile one combo and run one step (fills the on-disk caches), print JSON."""
    combo = Combo(**json.loads(args.worker))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    setup_torch(device)
    loss_fn, _ = make_loss()
    reference = load_reference(args.reference) if combo.impl == "reference" else None
    t0 = time.perf_counter()
    with inductor_patch(combo, args):
        step, _, objs = build_step(combo, args, device, loss_fn, reference)
        for _ in range(2):  # forward, backward; the compiled optimizer recompiles once its state exists
            step()
        sync(device)
    print("WORKER_RESULT " + json.dumps(dict(compile_s=time.perf_counter() - t0)), flush=True)


def est_gpu_gb(combo: Combo, args) -> float:
    """Rough GPU memory of a worker (measured peaks: DiT-B/2 24.8 GB, DiT-S/2 12.0 GB at batch 256 on
    256 tokens), plus the CUDA context; CUDA-graph pools and GEMM autotuning take a bit more."""
    hidden, depth, _, patch = arch(combo, args)
    tokens = (args.image_size // patch) ** 2
    scale = args.batch * tokens * hidden * depth / (256 * 256 * 768 * 12)
    mode = resolve_variant(combo.variant).compile_mode
    return 1.0 + 25.5 * scale * (1.25 if mode else 1.0)


def precompile(combos: list[Combo], args, device, deadline: float, log_dir: Path | None) -> dict[str, dict]:
    """Compile ``combos`` in parallel worker processes until ``deadline``; {combo key: result}."""
    results: dict[str, dict] = {}
    if not combos or args.precompile_workers <= 0:
        return results
    # the slowest compiles (max-autotune) first, so they overlap with the others
    slow = "max-autotune-no-cudagraphs"
    pending = sorted(combos, key=lambda c: resolve_variant(c.variant).compile_mode != slow)
    gpu_budget = (torch.cuda.get_device_properties(device).total_memory / 2**30 - 3.0
                  if device.type == "cuda" else float("inf"))
    threads = max(1, (os.cpu_count() or 2) // args.precompile_workers)
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(threads))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # workers share the GPU
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    passthrough = ["--batch", str(args.batch), "--image-size", str(args.image_size),
                   "--compile-backend", args.compile_backend] + (["--smoke"] if args.smoke else [])
    if args.depth:
        passthrough += ["--depth", str(args.depth)]
    if args.reference is not None:
        passthrough += ["--reference", str(args.reference)]
    if log_dir is None:  # worker output goes to files (a pipe could fill up and block a worker)
        import tempfile

        log_dir = Path(tempfile.mkdtemp(prefix="bench_train_workers_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[subprocess.Popen, tuple[Combo, float, float, Path]] = {}
    started = 0
    while (pending or running) and time.perf_counter() < deadline:
        used = sum(gb for _, _, gb, _ in running.values())
        while pending and len(running) < args.precompile_workers:
            # first pending combo that fits beside the running ones (a small model may overtake)
            fits = [c for c in pending if not running or used + est_gpu_gb(c, args) <= gpu_budget]
            if not fits:
                break
            combo, gb = fits[0], est_gpu_gb(fits[0], args)
            pending.remove(combo)
            log = log_dir / f"worker_{started:02d}.log"
            started += 1
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(combo))]
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd + passthrough, stdout=out, stderr=subprocess.STDOUT, env=env)
            running[proc] = (combo, time.perf_counter(), gb, log)
            used += gb
        for proc in [p for p in running if p.poll() is not None]:
            combo, t0, _, log = running.pop(proc)
            lines = log.read_text(errors="replace").splitlines()
            res = [ln for ln in lines if ln.startswith("WORKER_RESULT ")]
            if proc.returncode == 0 and res:
                results[combo.key()] = json.loads(res[-1].split(" ", 1)[1])
            else:
                results[combo.key()] = dict(error=f"worker exit {proc.returncode} (log: {log})")
            print(f"[{time.perf_counter() - T_PROCESS:6.0f} s] precompiled {combo.key()}: "
                  f"{results[combo.key()]}", flush=True)
        time.sleep(0.2)
    for proc, (combo, _, _, _) in running.items():  # past the deadline: stop our own workers
        proc.kill()
        proc.wait()
        results[combo.key()] = dict(error="precompile deadline reached")
    for combo in pending:
        results[combo.key()] = dict(error="not precompiled (deadline)")
    return results


# ------------------------------------------------------------------------------ the plan
def parse_backend_rows(spec: list[str]) -> list[tuple[str, str]]:
    rows = []
    for item in spec:
        backend, _, mode = item.partition(":")
        modes = [mode] if mode else ["eager", "compile"]
        rows += [(backend, m) for m in modes]
    return rows


def plan(args, have_reference: bool) -> list[Combo]:
    """All requested combos, most important first."""
    main_model, main_input = args.main_model, args.main_input
    impls = [i for i in args.impls if i != "reference" or have_reference]
    grid = [
        Combo(impl, m, i, "sdpa" if impl == "difftools" else "timm", mode)
        for impl in impls for m in args.models for i in args.inputs for mode in args.modes
    ]
    extra = [Combo("difftools", main_model, main_input, b, mode)
             for b, mode in parse_backend_rows(args.backend_rows)] if "difftools" in impls else []
    variants = [Combo("difftools", main_model, main_input, "sdpa", "compile", v)
                for v in args.variants if v != "default"] if "difftools" in impls else []
    combos, seen = [], set()
    for c in grid + extra + variants:
        if c.key() not in seen:
            seen.add(c.key())
            combos.append(c)

    def priority(c: Combo):
        main = c.model == main_model and c.input == main_input
        if main and c.mode == "compile" and c.variant == "default" and c.backend in ("sdpa", "timm"):
            return (0, c.impl != "difftools")  # the target row, then the reference beside it
        if c.variant != "default":
            return (1, args.variants.index(c.variant))
        if main and c.mode == "eager":
            return (2, c.impl != "difftools", c.backend == "math")
        if c.mode == "compile" and c.backend in ("sdpa", "timm"):
            return (3, c.model != main_model, c.input != main_input, c.impl != "difftools")
        if c.mode == "compile":
            return (4, {"xformers": 0, "cudnn": 1}.get(c.backend, 2), not main)
        return (5, c.model != main_model, c.input != main_input, c.impl != "difftools")

    return sorted(combos, key=priority)


def est_seconds(combo: Combo, precompiled: bool, smoke: bool) -> float:
    """Rough duration of a combo in the timed pass (for the time limit)."""
    if smoke:  # tiny model on CPU, aot_eager
        return 2.0 if combo.mode == "eager" else 8.0
    if combo.mode == "eager":
        return 8.0
    if precompiled:
        return 25.0
    return 240.0 if resolve_variant(combo.variant).compile_mode == "max-autotune-no-cudagraphs" else 60.0


# --------------------------------------------------------------------------------- output
def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(rows: list[Row], meta: dict, variant_names: list[str]) -> str:
    lines = [
        f"DiT training step, batch {meta['batch']}, {meta['image_size']}x{meta['image_size']} input, "
        f"{meta['dtype']}, {meta['optimizer']}; {meta['device_name']}; torch {meta['torch']}; "
        f"MFU vs {PEAK_TFLOPS:.0f} TFLOP/s (training = 3 x forward FLOPs); loss: {meta['loss']}; "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps; total {meta.get('total_s', '?')} s"
        + (f"; depth overridden to {meta['depth']}" if meta.get("depth") else "")
        + ("" if meta.get("complete") else " (**partial**: the run was still going or was cut off)") + ".",
        "",
        "| impl | model | input | attention | mode | variant | img/s | step ms | peak GB | MFU % "
        "| compile s | warmup s | note |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    vorder = {v: i for i, v in enumerate(["default"] + variant_names)}
    key = lambda r: (r.combo.model, r.combo.input, r.combo.impl != "difftools", r.combo.backend,
                     r.combo.mode, vorder.get(r.combo.variant, 99))
    for r in sorted(rows, key=key):
        c = r.combo
        chw = f"{meta['image_size']}x{meta['image_size']}x{4 if c.input == 'latent' else 3}"
        note = r.note if r.status == "ok" else f"**{r.status}** {r.note}".strip()
        lines.append(
            f"| {c.impl} | {c.model} | {c.input} {chw} | {c.backend} | {c.mode} | {c.variant} | "
            f"{fmt(r.images_per_s, '.0f')} | {fmt(r.step_ms, '.1f')} | {fmt(r.peak_gb, '.1f')} | "
            f"{fmt(None if r.mfu is None else 100 * r.mfu, '.1f')} | {fmt(r.compile_s, '.0f')} | "
            f"{fmt(r.warmup_s, '.0f')} | {note} |"
        )
    compiled = [r for r in rows if r.combo.mode == "compile" and "compile_cache" in r.extra]
    if compiled:
        hits = sum(1 for r in compiled if r.extra["compile_cache"].get("autograd_cache_hit", 0) > 0)
        lines += ["", f"Compiled rows that reused the precompile workers' artifacts (AOTAutograd cache "
                  f"hit): {hits} of {len(compiled)}; the others compiled cold inside `warmup s`."]
    base = next((r for r in rows if r.combo.variant == "default" and r.combo.impl == "difftools"
                 and r.combo.mode == "compile" and r.combo.backend == "sdpa"
                 and r.combo.model == meta["main_model"] and r.combo.input == meta["main_input"]
                 and r.step_ms), None)
    var_rows = [r for r in rows if r.combo.variant != "default"]
    if var_rows:
        lines += ["", f"Variants of difftools {meta['main_model']} {meta['main_input']} sdpa compile "
                  "(speed-up = default step time / variant step time):", ""]
        lines.append(f"- default: {VARIANTS['default'].about}; "
                     f"{fmt(base.step_ms if base else None, '.1f')} ms")
        for r in var_rows:
            speed = f"{base.step_ms / r.step_ms:.3f}x" if base and r.step_ms else "—"
            lines.append(f"- {r.combo.variant}: {resolve_variant(r.combo.variant).about}; "
                         f"{fmt(r.step_ms, '.1f')} ms, speed-up {speed}")
    prof = next((r.extra["profile"] for r in rows if "profile" in r.extra), None)
    if prof:
        cats = ", ".join(f"{k} {v:.1f}" for k, v in prof["by_category_ms"].items())
        idle = prof["wall_ms_per_step"] - prof["kernel_ms_per_step"]
        lines += ["", f"Profile of {prof['label']} ({prof['steps']} steps, profiler on): "
                  f"{prof['wall_ms_per_step']:.1f} ms/step wall, {prof['kernel_ms_per_step']:.1f} ms in "
                  f"{prof['kernels_per_step']:.0f} kernels (outside kernels ~{idle:.1f} ms); by category, "
                  f"ms/step: {cats}. Top kernels: profile_main.txt."]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path | None, rows: list[Row], meta: dict, variant_names: list[str]) -> str:
    table = markdown(rows, meta, variant_names)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_train.md").write_text(table)
        payload = dict(
            meta=meta,
            rows=[{**asdict(r.combo), **{k: v for k, v in asdict(r).items() if k != "combo"}} for r in rows],
        )
        (out / "bench_train.json").write_text(json.dumps(payload, indent=2))
    return table


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (< 1 min) exercising every code path")
    p.add_argument("--out", type=Path, default=None, help="write bench_train.md, .json, profile here")
    p.add_argument("--reference", type=Path, default=None,
                   help="folder with facebookresearch/DiT models.py + diffusion/")
    p.add_argument("--models", default="DiT-B/2,DiT-S/2")
    p.add_argument("--inputs", default="latent,pixel", help="latent = 4 channels, pixel = 3 channels")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--impls", default="difftools,reference", help="which implementations to time")
    p.add_argument("--main-model", default="DiT-B/2", help="model of the target row, backend rows, variants")
    p.add_argument("--main-input", default="latent")
    p.add_argument("--backend-rows", default="xformers:eager,xformers:compile,cudnn:eager,math:eager",
                   help="extra attention backends on the main model/input: backend[:mode],...")
    p.add_argument("--variants", default="lowp,cdtune,autotune,optcompile,cudagraphs",
                   help=f"variants of our compiled main row ({', '.join(VARIANTS)}; join with '+')")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--depth", type=int, default=None, help="override the presets' depth (smoke tests)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--time-limit-s", type=float, default=450.0,
                   help="hard bound from process start: rows that would not fit are listed as not run")
    p.add_argument("--precompile-workers", type=int, default=3, help="parallel compile processes (0: off)")
    p.add_argument("--precompile-s", type=float, default=250.0,
                   help="precompilation ends this many seconds after process start (workers still "
                   "running are stopped; their rows compile in the timed pass)")
    p.add_argument("--profile-steps", type=int, default=3, help="profile the main row (0: off)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: precompile one combo
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.inputs, args.batch, args.image_size = "DiT-T/8", "latent,pixel", 4, 16
        args.main_model, args.warmup, args.steps, args.time_limit_s = "DiT-T/8", 1, 2, 45.0
        args.compile_backend = "aot_eager"  # traces like inductor (dynamo + AOTAutograd) without codegen
        args.depth = 2  # 2 blocks trace 6x faster than 12 and exercise the same code
        args.variants, args.precompile_workers, args.precompile_s = "lowp,optcompile,cdtune", 1, 30.0
        args.profile_steps = 1
    for name in ("models", "inputs", "modes", "impls", "backend_rows", "variants"):
        setattr(args, name, [s.strip() for s in getattr(args, name).split(",") if s.strip()])
    for v in args.variants:
        resolve_variant(v)  # fail early on a typo
    return args


class _Deadline:
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


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args)
        return []
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    setup_torch(device)
    deadline = T_PROCESS + args.time_limit_s
    loss_fn, loss_name = make_loss()
    reference = None
    if args.reference is not None and "reference" in args.impls:
        reference = load_reference(args.reference)
    combos = plan(args, reference is not None)
    have_xf = device.type == "cuda" and xformers_available()
    meta = dict(
        batch=args.batch, image_size=args.image_size,
        dtype="bf16 autocast" if device.type == "cuda" else "fp32",
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else platform.processor() or "cpu"),
        torch=torch.__version__, loss=loss_name,
        optimizer="fused AdamW" if device.type == "cuda" else "AdamW (foreach)",
        warmup=args.warmup, steps=args.steps, peak_tflops=PEAK_TFLOPS, compile_backend=args.compile_backend,
        reference=str(args.reference), main_model=args.main_model, main_input=args.main_input,
        precompile_workers=args.precompile_workers, depth=args.depth, complete=False,
    )
    if have_xf:
        import xformers

        meta["xformers"] = xformers.__version__

    def skip_reason(c: Combo) -> str | None:
        if c.backend in ("xformers", "cudnn") and device.type != "cuda":
            return "needs CUDA"
        if c.backend == "xformers" and not have_xf:
            return "xformers not importable"
        if c.backend == "cudnn" and not cudnn_attention_available():
            return "cuDNN attention not available"
        if args.compile_backend != "inductor" and any(n in NEEDS_INDUCTOR for n in c.variant.split("+")):
            return f"needs the inductor backend (this run: {args.compile_backend})"
        return None

    runnable = [c for c in combos if skip_reason(c) is None]
    to_precompile = [c for c in runnable if c.mode == "compile"]
    if args.smoke:
        to_precompile = to_precompile[:1]  # exercises the worker path; aot_eager has no disk cache
    pre_deadline = min(deadline, T_PROCESS + args.precompile_s)
    pre = precompile(to_precompile, args, device, pre_deadline,
                     args.out / "precompile_logs" if args.out is not None else None)
    meta["precompile_s"] = round(time.perf_counter() - T_PROCESS, 1)

    rows: list[Row] = []
    for combo in combos:
        reason = skip_reason(combo)
        if reason:
            rows.append(Row(combo, status="skipped", note=reason))
            continue
        info = pre.get(combo.key(), {})
        now = time.perf_counter()
        if now + est_seconds(combo, "compile_s" in info, args.smoke) > deadline:
            rows.append(Row(combo, status="not run", note=f"time limit {args.time_limit_s:.0f} s; rerun "
                            "with --models/--inputs/--modes/--impls/--backend-rows/--variants to time it"))
            continue
        is_main = (combo.impl == "difftools" and combo.model == args.main_model and combo.variant == "default"
                   and combo.input == args.main_input and combo.backend == "sdpa" and combo.mode == "compile")
        with _Deadline(deadline):
            row = run_combo(combo, args, device, loss_fn, reference,
                            profile=is_main and args.profile_steps > 0)
        row.compile_s = info.get("compile_s")
        if "error" in info and combo.mode == "compile":
            row.extra["precompile"] = info["error"]
        rows.append(row)
        print(
            f"[{time.perf_counter() - T_PROCESS:6.0f} s] {combo.key():55s} {row.status:7s} step "
            f"{fmt(row.step_ms, '.1f')} ms  MFU {fmt(None if row.mfu is None else 100 * row.mfu, '.1f')}%  "
            f"warmup {fmt(row.warmup_s, '.0f')} s  {row.note}",
            flush=True,
        )
        meta["total_s"] = round(time.perf_counter() - T_PROCESS, 1)
        write_outputs(args.out, rows, meta, args.variants)
    meta["total_s"], meta["complete"] = round(time.perf_counter() - T_PROCESS, 1), True
    table = write_outputs(args.out, rows, meta, args.variants)
    print()
    print(table)
    if args.out is not None:
        print(f"wrote {args.out / 'bench_train.md'} and bench_train.json")
    return rows


if __name__ == "__main__":
    main()
