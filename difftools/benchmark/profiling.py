"""Where a step's time goes: kernel time by category (GEMM, attention, fused elementwise, optimizer),
from the PyTorch profiler."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        name = "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")
        (out_dir / f"profile_{name}.txt").write_text("\n".join(lines) + "\n")
    return summary


def kernel_ms(fn) -> float:
    """Total CUDA kernel time (ms) of one call of ``fn``."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
