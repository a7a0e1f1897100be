"""Parallel precompilation: compile-heavy rows are first compiled by worker processes (one compile and
one step each), which fill inductor's on-disk FX-graph / AOTAutograd / Triton caches; the timed pass
then runs every row alone on the GPU with cache hits. Compile time is the bottleneck of a table of
compiled rows (~30 s per graph for DiT-B/2 against ~3 s of timing)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from difftools.benchmark.train_step import Combo, StepConfig, arch, batch_of, resolve_variant

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds this difftools


def est_gpu_gb(combo: Combo, cfg: StepConfig) -> float:
    """Rough GPU memory of a worker (measured peaks: DiT-B/2 24.8 GB, DiT-S/2 12.0 GB at batch 256 on
    256 tokens, before the fused norm kernels stopped storing normalised tokens), plus the CUDA
    context; CUDA-graph pools and GEMM autotuning take a bit more. Also the rule that picks the batch
    (:func:`fitting_batch`)."""
    hidden, depth, _, patch = arch(combo, cfg)
    tokens = (cfg.image_size // patch) ** 2
    scale = batch_of(combo, cfg) * tokens * hidden * depth / (256 * 256 * 768 * 12)
    mode = resolve_variant(combo.variant).compile_mode
    return 1.0 + 25.5 * scale * (1.25 if mode else 1.0)


def fitting_batch(model: str, cfg: StepConfig, device, fraction: float = 0.85) -> int:
    """The common batch, halved until the estimated peak (:func:`est_gpu_gb`) fits ``fraction`` of the
    GPU (DiT-XL/2 at batch 256 needs ~90 GB by that estimate: batch 128 on an 80 GB H100); 0 (= the
    common batch) off CUDA."""
    if device.type != "cuda":
        return 0
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    batch = cfg.batch
    while batch > 1 and est_gpu_gb(Combo("difftools", model, "latent", "sdpa", "eager", batch=batch), cfg) \
            > fraction * total:
        batch //= 2
    return batch if batch != cfg.batch else 0


def precompile(combos: list[Combo], cfg: StepConfig, device, deadline: float, log_dir: Path | None,
               workers: int, worker_argv: list[str], t_start: float) -> dict[str, dict]:
    """Compile ``combos`` in up to ``workers`` parallel processes until ``deadline``; {combo key: result}.

    A worker is ``worker_argv + ["--worker", <combo as JSON>]`` (the benchmark script with the
    settings that enter the cache keys); it prints ``WORKER_RESULT {"compile_s": ...}``. Workers
    share the GPU by their estimated memory (:func:`est_gpu_gb`); their output goes to
    ``log_dir`` (a temporary folder for None). Progress lines give seconds since ``t_start``."""
    results: dict[str, dict] = {}
    if not combos or workers <= 0:
        return results
    # the slowest compiles (max-autotune) first, so they overlap with the others
    slow = "max-autotune-no-cudagraphs"
    pending = sorted(combos, key=lambda c: resolve_variant(c.variant).compile_mode != slow)
    gpu_budget = (torch.cuda.get_device_properties(device).total_memory / 2**30 - 3.0
                  if device.type == "cuda" else float("inf"))
    threads = max(1, (os.cpu_count() or 2) // workers)
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(threads))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # workers share the GPU
    # the workers import this very difftools, wherever it was imported from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    if log_dir is None:  # worker output goes to files (a pipe could fill up and block a worker)
        log_dir = Path(tempfile.mkdtemp(prefix="bench_train_workers_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[subprocess.Popen, tuple[Combo, float, float, Path]] = {}
    started = 0
    while (pending or running) and time.perf_counter() < deadline:
        used = sum(gb for _, _, gb, _ in running.values())
        while pending and len(running) < workers:
            # first pending combo that fits beside the running ones (a small model may overtake)
            fits = [c for c in pending if not running or used + est_gpu_gb(c, cfg) <= gpu_budget]
            if not fits:
                break
            combo, gb = fits[0], est_gpu_gb(fits[0], cfg)
            pending.remove(combo)
            log = log_dir / f"worker_{started:02d}.log"
            started += 1
            cmd = [*worker_argv, "--worker", json.dumps(asdict(combo))]
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
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
            print(f"[{time.perf_counter() - t_start:6.0f} s] precompiled {combo.key()}: "
                  f"{results[combo.key()]}", flush=True)
        time.sleep(0.2)
    for proc, (combo, _, _, _) in running.items():  # past the deadline: stop our own workers
        proc.kill()
        proc.wait()
        results[combo.key()] = dict(error="precompile deadline reached")
    for combo in pending:
        results[combo.key()] = dict(error="not precompiled (deadline)")
    return results
