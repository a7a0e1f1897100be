#!/usr/bin/env python
"""Sampling throughput: the eager loop against the compiled, CUDA-graphed fixed-shape sampler, in one
process, and the wall time of a 50,000-image evaluation at 20 NFE.

Models: the shared CIFAR-10 DiT-T/2 (``--ckpt``, a trained checkpoint) and DiT-B/2 / DiT-XL/2 shapes
(``--shapes``; latent 32x32x4, 1000 classes, random weights: the network costs the same whatever
its weights; perturbed so that no tensor is all zeros). Every row: dpmpp_2m, 19 steps + the final
denoising step = 20 NFE, classifier-free guidance 1.5 batched into one network call per NFE (the
network sees 2 x batch), bf16 autocast, per-image seeds (noise drawn on the CPU, as
``difftools.generate`` does). Variants (``--variants``):

* ``eager``: ``difftools.generate.generate_uint8``, i.e. ``samplers.sample`` calling the network step
  by step (a diffusers-pipeline-style loop on the same weights);
* ``graph``: :class:`difftools.graphed_sampling.GraphedSampler` without ``torch.compile`` (the solve
  as one CUDA graph);
* ``compiled_graph``: the same over a compiled network (the shipped fast path).

Per row: one-time set-up (compilation, capture, warm-up solves), steady img/s over ``--batches``
batches, and the wall time of 50,000 images (measured for the DiT-T/2 fast path when
``--full-eval``; otherwise set-up + 50,000 / img/s, marked "extrapolated"). The first batch of every
variant is compared with the eager one (mean |difference| in grey levels).

    python scripts/bench_sampling.py --ckpt .gpu/models/cifar10_dit_t2_flow --out $OUT/bench_sampling
    python scripts/bench_sampling.py --smoke --out /tmp/bench_sampling       # CPU, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

T_PROCESS = time.perf_counter()

import torch  # noqa: E402

from difftools.generate import SampleSpec, generate_uint8  # noqa: E402
from difftools.graphed_sampling import GraphedSampler, generate_graphed  # noqa: E402
from difftools.loaded import Loaded  # noqa: E402
from difftools.models.dit import dit_from_preset  # noqa: E402
from difftools.process import Flow  # noqa: E402

VARIANTS = ("eager", "graph", "compiled_graph")
EVAL_IMAGES = 50_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ckpt", type=Path, default=None, help="a trained run (the shared DiT-T/2)")
    p.add_argument("--shapes", default="DiT-B/2,DiT-XL/2", help="random-weight DiTs, latent 32x32x4")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ckpt-batch", type=int, default=500)
    p.add_argument("--shape-batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=3, help="timed batches per row (after the set-up)")
    p.add_argument("--steps", type=int, default=19, help="solver steps (+1 final denoising NFE)")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--full-eval", action="store_true", default=True,
                   help="measure the 50,000-image wall time of the checkpoint's compiled_graph row")
    p.add_argument("--no-full-eval", dest="full_eval", action="store_false")
    p.add_argument("--time-limit-s", type=float, default=210.0)
    p.add_argument("--smoke", action="store_true", help="CPU: a tiny DiT, 2 batches of 4, no 50k run")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.ckpt_batch, args.shape_batch, args.batches = "DiT-T/8", 4, 4, 1
        args.steps, args.full_eval, args.variants = 3, False, "eager,graph"
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown --variants {bad}; choose from {VARIANTS}")
    return args


def random_run(name: str, device, smoke: bool) -> Loaded:
    """A DiT of preset ``name`` on latent 32x32x4 (16x16x4 in smoke mode), 1000 classes, weights
    perturbed by N(0, 0.02^2) (adaLN-Zero starts at exact zeros: a product with zeros can run faster)."""
    size = 16 if smoke else 32
    torch.manual_seed(0)
    model = dit_from_preset(name, input_size=size, in_channels=4, num_classes=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Loaded(model.to(device).eval(), Flow(), "flow")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(run: Loaded, variant: str, spec: SampleSpec, batch: int, n_batches: int, device,
                 reference_first: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """(row, the first batch's uint8 images)."""
    t0 = time.perf_counter()
    if variant == "eager":
        draw = lambda idx: generate_uint8(run, idx, spec, batch_size=batch, device=device)[0]  # noqa: E731
        first = draw(range(batch))  # warm-up (cuDNN / cuBLAS selection, the attention probe)
    else:
        sampler = GraphedSampler(run, spec, batch, device=device, compile=variant == "compiled_graph")
        draw = lambda idx: generate_graphed(run, idx, sampler)[0]  # noqa: E731
        first = draw(range(batch))
        for _ in range(sampler.warmup):  # until the graph is captured and replayed once
            draw(range(batch))
    sync(device)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(n_batches):
        draw(range((k + 1) * batch, (k + 2) * batch))
    sync(device)
    dt = time.perf_counter() - t0
    img_s = n_batches * batch / dt
    row = dict(variant=variant, batch=batch, setup_s=setup_s, img_per_s=img_s, batch_s=dt / n_batches,
               eval_50k_s=setup_s + EVAL_IMAGES / img_s, eval_50k_kind="extrapolated", status="ok")
    if reference_first is not None:
        row["mean_abs_diff_vs_eager"] = float((first.float() - reference_first.float()).abs().mean())
    return row, first


def full_eval(run: Loaded, spec: SampleSpec, batch: int, device) -> dict:
    """The 50,000-image evaluation with the compiled graph, timed end to end (set-up included)."""
    t0 = time.perf_counter()
    sampler = GraphedSampler(run, spec, batch, device=device, compile=True)
    images, _, nfe = generate_graphed(run, range(EVAL_IMAGES), sampler)
    sync(device)
    return dict(eval_50k_s=time.perf_counter() - t0, eval_50k_kind="measured", images=int(images.shape[0]),
                nfe=nfe, pixel_mean=float(images.float().mean()))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Sampling: {meta['sampler']} {meta['steps']} steps + final step = {meta['nfe']} NFE, CFG "
             f"{meta['cfg']} batched (the network sees 2 x batch), {meta['precision']}, per-image seeds; "
             f"{meta['device_name']}; torch {meta['torch']}; total {meta.get('total_s', '?')} s.", "",
             "| model | variant | batch | img/s | vs eager | set-up s | 50k images s "
             "| mean abs diff vs eager (grey levels) | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['variant']} | — | — | — | — | — | — | **{r.get('status')}** "
                         f"{r.get('note', '')} |")
            continue
        eager = next((x for x in rows if x["model"] == r["model"] and x["variant"] == "eager"
                      and x.get("img_per_s")), None)
        vs = f"**{r['img_per_s'] / eager['img_per_s']:.2f}x**" if eager else "—"
        diff = r.get("mean_abs_diff_vs_eager")
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['img_per_s']:.0f} | {vs} | "
                     f"{r['setup_s']:.1f} | {r['eval_50k_s']:.0f} ({r['eval_50k_kind']}) | "
                     f"{'—' if diff is None else f'{diff:.3f}'} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def write(out: Path | None, rows: list[dict], meta: dict) -> str:
    table = markdown(rows, meta)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_sampling.md").write_text(table)
        (out / "bench_sampling.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return table


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    deadline = T_PROCESS + args.time_limit_s
    spec = SampleSpec(sampler="dpmpp_2m", steps=args.steps, guidance_scale=args.cfg, seed=0,
                      denoise_final=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), sampler=spec.sampler, steps=spec.steps, nfe=spec.steps + 1,
                cfg=args.cfg, precision=spec.precision,
                torch=torch.__version__, command=" ".join(sys.argv),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor() or "cpu")
    jobs = []
    if args.ckpt is not None:
        jobs.append((args.ckpt.name, lambda: __import__("difftools").load(args.ckpt, device=device),
                     args.ckpt_batch))
    jobs += [(name, lambda name=name: random_run(name, device, args.smoke), args.shape_batch)
             for name in args.shapes]
    rows = []
    for name, make_run, batch in jobs:
        try:
            run = make_run()
        except Exception as err:
            traceback.print_exc()
            rows.append(dict(model=name, variant="—", status="error", note=f"{type(err).__name__}: {err}"))
            continue
        first = None
        for variant in args.variants:
            if time.perf_counter() > deadline:
                rows.append(dict(model=name, variant=variant, status="not run",
                                 note=f"time limit {args.time_limit_s:.0f} s"))
                continue
            try:
                row, images = time_variant(run, variant, spec, batch, args.batches, device,
                                           first if variant != "eager" else None)
                if variant == "eager":
                    first = images
            except Exception as err:  # a failing variant prints its error row; the others go on
                traceback.print_exc()
                row = dict(variant=variant, status="error", note=f"{type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200]}")
            row["model"] = name
            rows.append(row)
            print(f"[{time.perf_counter() - T_PROCESS:5.0f} s] {name} {variant}: {row.get('status')} "
                  f"{row.get('img_per_s', 0):.0f} img/s", flush=True)
            meta["total_s"] = round(time.perf_counter() - T_PROCESS, 1)
            write(args.out, rows, meta)
        is_ckpt = args.ckpt is not None and name == args.ckpt.name
        if is_ckpt and args.full_eval and "compiled_graph" in args.variants:
            fast = next((r for r in rows if r["model"] == name and r["variant"] == "compiled_graph"
                         and r.get("status") == "ok"), None)
            if fast is not None and time.perf_counter() + 1.2 * fast["eval_50k_s"] < deadline:
                try:
                    fast.update(full_eval(run, spec, batch, device))
                except Exception as err:
                    traceback.print_exc()
                    fast["note"] = f"50k run failed: {type(err).__name__}: {err}"
            elif fast is not None:
                fast["note"] = "50k run skipped (time limit): extrapolated"
        del run
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["total_s"] = round(time.perf_counter() - T_PROCESS, 1)
    print(write(args.out, rows, meta))


if __name__ == "__main__":
    main()
