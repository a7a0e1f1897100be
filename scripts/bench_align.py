"""Cost of the SRA² alignment branch: head sizes, analytic FLOPs ratio, measured step-time ratio.

    python scripts/bench_align.py --sizes                  # head-size table (no timing; CPU, 1 s)
    python scripts/bench_align.py --model DiT-S/2 --input-size 32 --in-channels 4 --batch 256   # GPU
    python scripts/bench_align.py --model DiT-S/2 --input-size 8 --in-channels 32 --batch 16 \\
        --repeats 5 --steps 3 --threads 1                                                      # CPU

``--sizes`` prints, for DiT-S/B/L/XL at 256 tokens (ImageNet 256 latents, 32x32x4) and the
alignment experiment's DiT-S/1 on 8x8x32 latents, the default head (block from the model depth,
widths 2D): its parameters (counted on the module) and its analytic FLOPs overhead per training
step.

Analytic: projector forward FLOPs per image / DiT forward FLOPs per image (``model.flops_per_image``;
a multiply-add = 2 FLOPs). The backward of each costs about twice its forward, so the ratio holds
for a training step. Measured: full training steps (forward, backward, AdamW) of the same model with
the plain denoising loss and with the aligned loss, in alternating blocks of ``--steps`` steps so
that drifts of the machine hit both alike; the overhead is the median over blocks of
aligned / vanilla - 1. bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from difftools.device import default_device
from difftools.losses import build_loss
from difftools.losses.alignment import PAPER_WIDTH_MULT, default_widths, projector_flops
from difftools.models.dit import PRESETS, DiT, parse_preset
from difftools.process import make_process


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--patch", type=int, default=None, help="override the preset's patch size")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--align-depth", type=int, default=None, help="default: from the model depth")
    p.add_argument("--width-mult", type=float, default=PAPER_WIDTH_MULT, help="projector widths = M * D")
    p.add_argument("--sizes", action="store_true", help="print the head-size table and exit (no timing)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per variant (alternating)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the result JSON here")
    return p.parse_args(argv)


#: (label, preset, patch, latent channels, latent size) of the head-size table
SIZE_ROWS = [(f"{name}/2", name, 2, 4, 32) for name in ("DiT-S", "DiT-B", "DiT-L", "DiT-XL")] + [
    ("DiT-S/1 (align experiment)", "DiT-S", 1, 32, 8)]


def head_sizes(width_mult: float = PAPER_WIDTH_MULT) -> list[dict]:
    """The default alignment head of each :data:`SIZE_ROWS` model: parameters counted on the
    module, FLOPs from ``flops_per_image`` and the projector's layer sizes (no weights allocated)."""
    rows = []
    for label, preset, patch, channels, size in SIZE_ROWS:
        hidden, depth, heads = PRESETS[preset]
        with torch.device("meta"):
            model = DiT(size, channels, patch, hidden, depth, heads, num_classes=1000)
            loss = build_loss({"prediction": "flow", "align": {"weight": 1.0, "depth": None,
                                                               "widths": default_widths(hidden, width_mult)}},
                              model, make_process("flow"))
        rows.append({
            "model": label, "latent": f"{channels}x{size}x{size}", "tokens": model.num_tokens,
            "blocks": depth, "align_depth": loss.depth, "widths": loss.projector.widths,
            "dit_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "head_params_m": loss.projector.num_parameters() / 1e6,
            "dit_gflops": model.flops_per_image() / 1e9,
            "head_gflops": projector_flops(loss.projector, model.num_tokens) / 1e9,
            "flops_overhead_pct": 100 * loss.flops_overhead(model),
        })
    return rows


def size_table(rows: list[dict]) -> str:
    lines = ["| model | latent | tokens | blocks | aligned block | head widths | DiT params (M) | "
             "head params (M) | DiT GFLOPs/img | head GFLOPs/img | FLOPs overhead |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['latent']} | {r['tokens']} | {r['blocks']} | {r['align_depth']} | "
                     f"{r['widths'][0]} x {len(r['widths'])} | {r['dit_params_m']:.2f} | "
                     f"{r['head_params_m']:.2f} | {r['dit_gflops']:.3f} | {r['head_gflops']:.3f} | "
                     f"{r['flops_overhead_pct']:.2f} % |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.sizes:
        rows = head_sizes(args.width_mult)
        print(size_table(rows))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=2))
        return {"sizes": rows}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = default_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    hidden, depth, heads, patch = parse_preset(args.model)
    model = DiT(args.input_size, args.in_channels, args.patch or patch, hidden, depth, heads, num_classes=10)
    model = model.to(device).train()
    process = make_process("flow")
    plain = build_loss({"prediction": "flow"}, model, process).to(device)
    widths = default_widths(model.hidden_size, args.width_mult)
    align = {"weight": 1.0, "depth": args.align_depth, "widths": widths}
    aligned = build_loss({"prediction": "flow", "align": align}, model, process).to(device)
    opt = torch.optim.AdamW(list(model.parameters()) + list(aligned.parameters()), lr=1e-4)
    x0 = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step(loss_fn):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = loss_fn(model, x0, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def block(loss_fn, n):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step(loss_fn)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    block(plain, args.warmup)
    block(aligned, args.warmup)
    times = {"vanilla": [], "aligned": []}
    ratios = []
    for _ in range(args.repeats):
        tv = block(plain, args.steps)
        ta = block(aligned, args.steps)
        times["vanilla"].append(tv)
        times["aligned"].append(ta)
        ratios.append(ta / tv)
    result = {
        "model": args.model,
        "patch": model.patch_size,
        "tokens": model.num_tokens,
        "latent": [args.in_channels, args.input_size, args.input_size],
        "batch": args.batch,
        "align_depth": aligned.depth,
        "head_widths": aligned.projector.widths,
        "head_params": aligned.projector.num_parameters(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "dit_gflops_per_image": model.flops_per_image() / 1e9,
        "projector_gflops_per_image": projector_flops(aligned.projector, model.num_tokens) / 1e9,
        "flops_overhead_analytic": aligned.flops_overhead(model),
        "step_ms_vanilla": 1e3 * statistics.median(times["vanilla"]),
        "step_ms_aligned": 1e3 * statistics.median(times["aligned"]),
        "step_time_overhead": statistics.median(ratios) - 1.0,
        "command": "python scripts/bench_align.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
