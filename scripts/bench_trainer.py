#!/usr/bin/env python
"""Throughput of the training engine (``difftools.training.Trainer``) on small DiTs: today's
configuration against the speed paths, in one process, and what bounds each size.

Per model (default DiT-T/2 and DiT-S/2 on CIFAR-10 pixels, batch 256, flow matching with
logit-normal t, bf16 autocast, ``torch.compile``, fused AdamW, EMA, grad clipping) the same run in
these configurations (``--configs``):

* ``loader``: the DataLoader with worker processes, eager step (what ``train/dit.py trainer=gpu
  trainer.compile=true`` did before: the configuration of issue 18's 8,256 img/s for DiT-T/2);
* ``device_data``: batches gathered on the GPU (``trainer.data_on_device=on``), eager step;
* ``graphs``: device batches and the whole optimizer step as one CUDA graph
  (``trainer.cuda_graphs=true``).

img/s is the mean of the logging windows after the first (the first holds compilation and capture).
For ``graphs`` the captured step is then replayed back to back and timed with CUDA events: the GPU
time of one step with no host in the way. ``trainer ms / graph ms`` near 1 means the run is bound by
the GPU; the difference is host time per step (loader, Python, launches).

    python scripts/bench_trainer.py --out $OUT/bench_trainer                 # GPU, ~3 minutes
    python scripts/bench_trainer.py --smoke --out /tmp/bench_trainer         # CPU, digits, < 1 minute

The test split is the default data (10,000 CIFAR-10 images: what travels to a GPU machine beside
the rest; the step does the same work on either split). Writes bench_trainer.json and .md.
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

from difftools.data import build_dataset  # noqa: E402
from difftools.losses import DenoisingLoss  # noqa: E402
from difftools.models.dit import dit_from_preset  # noqa: E402
from difftools.process import Flow  # noqa: E402
from difftools.training import DenoisingObjective, Trainer, TrainerConfig  # noqa: E402

CONFIGS = {
    "loader": dict(data_on_device="off", cuda_graphs=False),
    "device_data": dict(data_on_device="on", cuda_graphs=False),
    "graphs": dict(data_on_device="on", cuda_graphs=True),
}


class _Records:
    """Stands in for the run's MetricsLog: keeps the log windows (an in-memory run writes nothing)."""

    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        """Nothing to flush: the records stay in memory."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--models", default="DiT-T/2,DiT-S/2")
    p.add_argument("--configs", default="loader,graphs,device_data", help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--split", default="test")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--replays", type=int, default=30, help="graph replays timed back to back")
    p.add_argument("--time-limit-s", type=float, default=190.0,
                   help="from process start: runs that would not fit are listed as not run")
    p.add_argument("--smoke", action="store_true", help="CPU, digits, 2 blocks, a few steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.data, args.split, args.batch = "DiT-T/4", "digits", "train", 32
        args.steps, args.log_every, args.compile, args.configs = 6, 2, False, "loader,device_data"
    args.models = [m for m in args.models.split(",") if m]
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    return args


def graph_ms(trainer: Trainer, replays: int) -> float | None:
    """GPU time of one captured step, replayed back to back (median of ``replays``)."""
    graphed = getattr(trainer, "_graphed", None)
    if graphed is None or graphed.graph is None:
        return None
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphed.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_one(model_name: str, config: str, dataset, args) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run
    torch._dynamo.reset()
    torch.manual_seed(0)
    info = dataset.info
    model = dit_from_preset(model_name, input_size=info.image_size, in_channels=info.channels,
                            num_classes=info.num_classes)
    process = Flow()
    objective = DenoisingObjective(model, DenoisingLoss(process, "flow", "logit_normal"), process, "flow",
                                   dataset_info=info)
    cfg = TrainerConfig(batch_size=args.batch, max_steps=args.steps, lr=4e-4, warmup_steps=100,
                        ema_decay=0.9995, log_every=args.log_every, progress=False, tensorboard=False,
                        compile=args.compile, device="cpu" if args.smoke else "auto",
                        cpu_threads=1 if args.smoke else None, **CONFIGS[config])
    trainer = Trainer(objective, cfg, None, dataset=dataset)
    trainer.metrics = _Records()
    t0 = time.perf_counter()
    result = trainer.train()
    windows = [r for r in trainer.metrics.records if "img_per_s" in r]
    steady = windows[1:] or windows
    img_s = sum(r["img_per_s"] for r in steady) / len(steady)
    row = dict(model=model_name, config=config, status="ok", steps=result.step,
               seconds=time.perf_counter() - t0, img_per_s=img_s, step_ms=args.batch * 1000 / img_s,
               mfu=steady[-1].get("mfu"), final_loss=result.final_loss, windows=windows)
    row["graph_ms"] = graph_ms(trainer, args.replays) if torch.cuda.is_available() else None
    if row["graph_ms"]:
        row["host_ms"] = row["step_ms"] - row["graph_ms"]
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Trainer throughput, {meta['data']} ({meta['split']}), batch {meta['batch']}, "
             f"{meta['steps']} steps (img/s: mean of the log windows after the first), "
             f"compile={meta['compile']}; {meta['device_name']}; torch {meta['torch']}; "
             f"total {meta.get('total_s', '?')} s.", "",
             "| model | config | img/s | step ms | MFU % | vs loader | graph replay ms | host ms/step "
             "| bound by | final loss | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        base = next((x for x in rows if x["model"] == r["model"] and x["config"] == "loader"
                     and x.get("img_per_s")), None)
        if r.get("img_per_s") is None:
            lines.append(f"| {r['model']} | {r['config']} | — | — | — | — | — | — | — | — "
                         f"| **{r['status']}** {r.get('note', '')} |")
            continue
        vs = f"**{r['img_per_s'] / base['img_per_s']:.2f}x**" if base else "—"
        g = r.get("graph_ms")
        graph = "—" if not g else f"{g:.2f}"
        host = "—" if not g else f"{r['host_ms']:.2f}"
        bound = "—" if not g else ("GPU" if r["step_ms"] < 1.1 * g else "host")
        mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}"
        lines.append(f"| {r['model']} | {r['config']} | {r['img_per_s']:.0f} | {r['step_ms']:.2f} | {mfu} "
                     f"| {vs} | {graph} | {host} | {bound} | {r['final_loss']:.4f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    deadline = T_PROCESS + args.time_limit_s
    dataset = build_dataset(args.data, split=args.split, random_flip=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), data=args.data, split=args.split, batch=args.batch,
                steps=args.steps, compile=args.compile,
                torch=torch.__version__, command=" ".join(sys.argv),
                device_name=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke
                else platform.processor() or "cpu")
    rows, est = [], {}
    for config in args.configs:  # the configs in order, each over every model: the comparison first
        for model_name in args.models:
            guess = est.get(model_name, 60.0)
            if time.perf_counter() + guess > deadline:
                rows.append(dict(model=model_name, config=config, status="not run",
                                 note=f"time limit {args.time_limit_s:.0f} s"))
                continue
            t0 = time.perf_counter()
            try:
                row = run_one(model_name, config, dataset, args)
            except Exception as err:  # one failing configuration must not cost the others
                traceback.print_exc()
                row = dict(model=model_name, config=config, status="error",
                           note=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            est[model_name] = 0.8 * (time.perf_counter() - t0)  # later runs hit the compile cache
            rows.append(row)
            print(f"[{time.perf_counter() - T_PROCESS:5.0f} s] {model_name} {config}: {row.get('status')} "
                  f"{row.get('img_per_s', 0):.0f} img/s graph {row.get('graph_ms')}", flush=True)
            meta["total_s"] = round(time.perf_counter() - T_PROCESS, 1)
            write(args.out, rows, meta)
    table = write(args.out, rows, meta)
    print(table)


def write(out: Path | None, rows: list[dict], meta: dict) -> str:
    table = markdown(rows, meta)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_trainer.md").write_text(table)
        (out / "bench_trainer.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    return table


if __name__ == "__main__":
    main()
