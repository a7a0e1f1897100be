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

1. ours vs the reference, compiled, on the headline models ``--variant-models`` (DiT-B/2, DiT-XL/2);
2. ``--variants`` of our compiled DiT-B/2 row, side by side with ``default``, so a speed change is
   measured, not assumed (``difftools.benchmark.train_step.VARIANTS``: ``torchnorm`` = the
   residual/norm/modulation steps as plain ops fused by inductor instead of the Triton kernels;
   ``lowp`` = bf16 residual stream; ``fp8`` / ``fp8row`` = the blocks' token GEMMs in float8 with
   tensorwise / rowwise scales, torchao, skipped without it or below compute capability 8.9;
   combine with ``+``);
3. ours vs the reference, compiled, on the rest of ``--models`` (DiT-S/2, DiT-T/2: MFU by size);
4. the variants on the other headline models (DiT-XL/2);
5. eager rows (``--modes`` includes eager) for ``--eager-models`` (DiT-B/2);
6. ``--backend-rows`` on the main model / input (e.g. ``xformers:compile``; none by default).

The step includes each implementation's EMA update (``--no-ema`` leaves it out). The batch is
``--batch`` (256) unless the model would not fit the GPU at it by the harness' memory estimate
(DiT-XL/2 on an 80 GB H100: 128); the ``batch`` column says which. ``--profile-models`` profiles
their default compiled row (kernel time by category: what bounds each size).

Compile time is the bottleneck of such a table (~30 s per graph for DiT-B/2 against ~3 s of timing),
so on CUDA the compiled rows are first compiled by ``--precompile-workers`` parallel worker processes
(one compile + one step each) that fill inductor's on-disk FX-graph / AOTAutograd / Triton caches;
the timed pass then runs every row alone on the GPU, re-tracing with cache hits. The ``compile s``
column is that cold compile in a worker (sharing the CPU with the others); ``warmup s`` the
cache-hit compile plus warm-up steps of the timed pass. The main row is also profiled (kernel time
by category: GEMM, attention, Triton-fused elementwise, optimizer, GPU idle).

The harness lives in :mod:`difftools.benchmark` (rows and timing, plan, precompilation, profiling,
report); this script is its command line. Full CUDA run (bounded at 8.5 minutes from process start
by --time-limit-s 510):

    PYTHONPATH=$PWD python scripts/bench_train.py --reference .gpu/ref_dit --out $OUT/bench_train

CPU smoke test (< 1 minute): ``python scripts/bench_train.py --smoke --out /tmp/bench_smoke``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()  # the time limit counts from here (before the slow imports)

import torch  # noqa: E402

from difftools.benchmark.plan import est_seconds, plan  # noqa: E402
from difftools.benchmark.precompile import fitting_batch, precompile  # noqa: E402
from difftools.benchmark.reference_dit import load_reference  # noqa: E402
from difftools.benchmark.report import fmt, write_outputs  # noqa: E402
from difftools.benchmark.train_step import (  # noqa: E402
    LOSS_NAME,
    NEEDS_INDUCTOR,
    PEAK_TFLOPS,
    VARIANTS,
    Combo,
    Deadline,
    Row,
    StepConfig,
    build_step,
    inductor_patch,
    make_loss,
    resolve_variant,
    run_combo,
    setup_torch,
    sync,
)
from difftools.nn.attention import cudnn_attention_available, xformers_available  # noqa: E402
from difftools.nn.fp8 import Float8Unavailable, require_float8_device, require_torchao  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (< 1 min) exercising every code path")
    p.add_argument("--out", type=Path, default=None, help="write bench_train.md, .json, profile here")
    p.add_argument("--reference", type=Path, default=None,
                   help="folder with facebookresearch/DiT models.py + diffusion/")
    p.add_argument("--models", default="DiT-B/2,DiT-XL/2,DiT-S/2,DiT-T/2")
    p.add_argument("--inputs", default="latent", help="latent = 4 channels, pixel = 3 channels")
    p.add_argument("--modes", default="compile,eager")
    p.add_argument("--eager-models", default="DiT-B/2", help="eager rows only for these ('' = all models)")
    p.add_argument("--impls", default="difftools,reference", help="which implementations to time")
    p.add_argument("--main-model", default="DiT-B/2", help="model of the backend rows")
    p.add_argument("--main-input", default="latent")
    p.add_argument("--variant-models", default="DiT-B/2,DiT-XL/2",
                   help="headline models: ours vs the reference first, then the variants on each")
    p.add_argument("--backend-rows", default="",
                   help="extra attention backends on the main model/input: backend[:mode],... "
                   "(e.g. xformers:compile,cudnn:eager,math:eager)")
    p.add_argument("--variants", default="torchnorm",
                   help=f"variants of our compiled headline rows ({', '.join(VARIANTS)}; join with '+')")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="leave the EMA update out of the step (default: each implementation's own)")
    p.add_argument("--profile-models", default="DiT-B/2,DiT-S/2,DiT-T/2",
                   help="profile the default compiled row of these models (kernel time by category)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--depth", type=int, default=None, help="override the presets' depth (smoke tests)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--time-limit-s", type=float, default=510.0,
                   help="hard bound from process start: rows that would not fit are listed as not run")
    p.add_argument("--precompile-workers", type=int, default=3, help="parallel compile processes (0: off)")
    p.add_argument("--precompile-s", type=float, default=270.0,
                   help="precompilation ends this many seconds after process start (workers still "
                   "running are stopped; their rows compile in the timed pass)")
    p.add_argument("--profile-steps", type=int, default=3, help="profile the main row (0: off)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: precompile one combo
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.inputs, args.batch, args.image_size = "DiT-T/8,DiT-S/8", "latent,pixel", 4, 16
        args.main_model, args.warmup, args.steps = "DiT-T/8", 1, 2
        args.variant_models, args.eager_models, args.profile_models = "DiT-T/8", "DiT-T/8", "DiT-T/8"
        if args.time_limit_s == p.get_default("time_limit_s"):
            args.time_limit_s = 120.0  # a busy 2-core CPU box
        args.compile_backend = "aot_eager"  # traces like inductor (dynamo + AOTAutograd) without codegen
        args.depth = 2  # 2 blocks trace 6x faster than 12 and exercise the same code
        args.variants, args.precompile_workers, args.precompile_s = "torchnorm,lowp,cdtune,fp8", 1, 40.0
        args.backend_rows = "math:eager"
        args.profile_steps = 1
    for name in ("models", "inputs", "modes", "impls", "backend_rows", "variants", "variant_models",
                 "eager_models", "profile_models"):
        setattr(args, name, [s.strip() for s in getattr(args, name).split(",") if s.strip()])
    for v in args.variants:
        resolve_variant(v)  # fail early on a typo
    return args


def fp8_problem(device: torch.device) -> str | None:
    """Why the fp8 variants cannot run here (torchao missing, a GPU without fp8 tensor cores), or None.
    On the CPU (smoke runs) they run through torch's CPU ``_scaled_mm``: the code path, not a speed."""
    try:
        require_torchao()
        if device.type == "cuda":
            require_float8_device(device, "the fp8 variants")
    except Float8Unavailable as err:
        return str(err)
    return None


def step_config(args) -> StepConfig:
    return StepConfig(batch=args.batch, image_size=args.image_size, depth=args.depth,
                      compile_backend=args.compile_backend, warmup=args.warmup, steps=args.steps,
                      ema=args.ema)


def worker_argv(args) -> list[str]:
    """This script with the settings that enter the compile caches (for the precompile workers)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--batch", str(args.batch), "--image-size",
            str(args.image_size), "--compile-backend", args.compile_backend]
    argv += ["--smoke"] if args.smoke else []
    argv += ["--depth", str(args.depth)] if args.depth else []
    argv += ["--reference", str(args.reference)] if args.reference is not None else []
    argv += [] if args.ema else ["--no-ema"]
    return argv


def worker_main(args) -> None:
    """Precompile worker: compile one combo and run one step (fills the on-disk caches), print JSON."""
    combo = Combo(**json.loads(args.worker))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    setup_torch(device)
    cfg = step_config(args)
    reference = load_reference(args.reference) if combo.impl == "reference" else None
    t0 = time.perf_counter()
    with inductor_patch(combo, cfg):
        step, _, objs = build_step(combo, cfg, device, make_loss(), reference)
        for _ in range(2):  # forward, backward; the compiled optimizer recompiles once its state exists
            step()
        sync(device)
    print("WORKER_RESULT " + json.dumps(dict(compile_s=time.perf_counter() - t0)), flush=True)


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args)
        return []
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    setup_torch(device)
    deadline = T_PROCESS + args.time_limit_s
    loss_fn, cfg = make_loss(), step_config(args)
    reference = None
    if args.reference is not None and "reference" in args.impls:
        reference = load_reference(args.reference)
    combos = plan(impls=args.impls, models=args.models, inputs=args.inputs, modes=args.modes,
                  main_model=args.main_model, main_input=args.main_input, backend_rows=args.backend_rows,
                  variants=args.variants, have_reference=reference is not None,
                  variant_models=args.variant_models, eager_models=args.eager_models or None,
                  batch_for=lambda model: fitting_batch(model, cfg, device))
    have_xf = device.type == "cuda" and xformers_available()
    meta = dict(
        batch=args.batch, image_size=args.image_size,
        dtype="bf16 autocast" if device.type == "cuda" else "fp32",
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else platform.processor() or "cpu"),
        torch=torch.__version__, loss=LOSS_NAME,
        optimizer="fused AdamW" if device.type == "cuda" else "AdamW (foreach)",
        warmup=args.warmup, steps=args.steps, peak_tflops=PEAK_TFLOPS, compile_backend=args.compile_backend,
        reference=str(args.reference), main_model=args.main_model, main_input=args.main_input,
        precompile_workers=args.precompile_workers, depth=args.depth, complete=False, ema=args.ema,
        date=time.strftime("%Y-%m-%d"),
        variant_models=args.variant_models, command=" ".join(sys.argv),
        gpu_memory_gb=(round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
                       if device.type == "cuda" else None),
    )
    if have_xf:
        import xformers  # optional: only where it is installed

        meta["xformers"] = xformers.__version__
    no_fp8 = fp8_problem(device) if any(resolve_variant(v).fp8 for v in args.variants) else None
    if no_fp8 is None and any(resolve_variant(v).fp8 for v in args.variants):
        import torchao  # the fp8 extra: only where it is installed

        meta["torchao"] = torchao.__version__

    def skip_reason(c: Combo) -> str | None:
        if c.backend in ("xformers", "cudnn") and device.type != "cuda":
            return "needs CUDA"
        if c.backend == "xformers" and not have_xf:
            return "xformers not importable"
        if c.backend == "cudnn" and not cudnn_attention_available():
            return "cuDNN attention not available"
        if no_fp8 is not None and resolve_variant(c.variant).fp8:
            return no_fp8
        if args.compile_backend != "inductor" and any(n in NEEDS_INDUCTOR for n in c.variant.split("+")):
            return f"needs the inductor backend (this run: {args.compile_backend})"
        return None

    runnable = [c for c in combos if skip_reason(c) is None]
    to_precompile = [c for c in runnable if c.mode == "compile"]
    if args.smoke:
        to_precompile = to_precompile[:1]  # exercises the worker path; aot_eager has no disk cache
    pre_deadline = min(deadline, T_PROCESS + args.precompile_s)
    pre = precompile(to_precompile, cfg, device, pre_deadline,
                     args.out / "precompile_logs" if args.out is not None else None,
                     args.precompile_workers, worker_argv(args), T_PROCESS)
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
        profiled = (combo.impl == "difftools" and combo.model in args.profile_models
                    and combo.variant == "default" and combo.input == args.main_input
                    and combo.backend == "sdpa" and combo.mode == "compile")
        with Deadline(deadline):
            row = run_combo(combo, cfg, device, loss_fn, reference,
                            profile_steps=args.profile_steps if profiled else 0, profile_dir=args.out)
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
