#!/usr/bin/env python
"""Render docs/benchmarks.md's speed tables and the MFU-by-size plot from the benchmark JSON files.

    python scripts/bench_report.py --train OUT/bench_train --trainer OUT/bench_trainer \\
        --sampling OUT/bench_sampling --docs docs/benchmarks.md --img docs/img

Each given folder's JSON (``bench_train.json`` of scripts/bench_train.py, ``bench_trainer.json``,
``bench_sampling.json``) becomes a block of markdown that replaces the text between the markers
``<!-- bench_report:NAME -->`` and ``<!-- /bench_report:NAME -->`` (NAME = train, trainer, sampling)
in ``--docs``; blocks whose JSON is not given are left as they are. The plot (``mfu_by_size.png``:
MFU of ours and of the reference, compiled, by model) goes to ``--img``. Without ``--docs`` the
blocks are printed. Every block states the device, torch version, date and command of its run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SIZES = ("DiT-T", "DiT-S", "DiT-B", "DiT-L", "DiT-XL")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, default=None, help="folder with bench_train.json")
    p.add_argument("--trainer", type=Path, default=None, help="folder with bench_trainer.json")
    p.add_argument("--sampling", type=Path, default=None, help="folder with bench_sampling.json")
    p.add_argument("--docs", type=Path, default=None, help="markdown file with the bench_report markers")
    p.add_argument("--img", type=Path, default=None, help="folder for mfu_by_size.png")
    return p.parse_args(argv)


def _load(folder: Path | None, name: str) -> dict | None:
    if folder is None:
        return None
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the folder the benchmark wrote (its --out)")
    return json.loads(path.read_text())


def _f(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _origin(meta: dict) -> str:
    return (f"{meta.get('device_name', '?')}, torch {meta.get('torch', '?')}, {meta.get('date', '?')}; "
            f"command: `{meta.get('command', '?')}`")


def _size_rank(model: str) -> tuple:
    arch, _, patch = model.partition("/")
    return (SIZES.index(arch) if arch in SIZES else 99, patch)


def _ours_and_ref(rows: list[dict], mode: str = "compile") -> list[tuple[dict, dict | None]]:
    ours = [r for r in rows if r["impl"] == "difftools" and r["variant"] == "default"
            and r["backend"] == "sdpa" and r["mode"] == mode and r.get("step_ms")]
    pairs = []
    for r in sorted(ours, key=lambda r: (_size_rank(r["model"]), r["input"])):
        ref = next((x for x in rows if x["impl"] == "reference" and x["model"] == r["model"]
                    and x["input"] == r["input"] and x["mode"] == mode and x["batch"] == r["batch"]
                    and x.get("step_ms")), None)
        pairs.append((r, ref))
    return pairs


def train_block(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    batch = lambda r: r["batch"] or meta["batch"]  # noqa: E731
    lines = [f"Measured on {_origin(meta)}. One step: {meta['dtype']} forward + loss, backward, "
             f"{meta['optimizer']}"
             f"{', EMA update (each implementation its own)' if meta.get('ema') else ''}; "
             f"{meta['image_size']}x{meta['image_size']} input; {meta['warmup']} warm-up + {meta['steps']} "
             f"timed steps; MFU = 3 x forward FLOPs x img/s / {meta.get('peak_tflops', 790):.0f} TFLOP/s. "
             "Ratio = reference step time / ours (same process, same batch).", "",
             "| model | input | mode | batch | difftools img/s | MFU % | reference img/s | MFU % | ratio |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode in ("compile", "eager"):
        for r, ref in _ours_and_ref(rows, mode):
            ratio = f"**{ref['step_ms'] / r['step_ms']:.2f}x**" if ref else "—"
            lines.append(f"| {r['model']} | {r['input']} | {mode} | {batch(r)} | {r['images_per_s']:.0f} | "
                         f"{100 * r['mfu']:.1f} | {_f(ref and ref['images_per_s'], '.0f')} | "
                         f"{_f(ref and 100 * ref['mfu'], '.1f')} | {ratio} |")
    variants = [r for r in rows if r["impl"] == "difftools" and r["variant"] != "default"]
    if variants:
        lines += ["", "Variants of our compiled step (speed-up = our default step time / the variant's):", "",
                  "| model | variant | img/s | MFU % | speed-up vs our default | vs reference | note |",
                  "|---|---|---:|---:|---:|---:|---|"]
        pairs = {(r["model"], r["input"], r["batch"]): (r, ref) for r, ref in _ours_and_ref(rows)}
        for v in variants:
            base, ref = pairs.get((v["model"], v["input"], v["batch"]), (None, None))
            ok = v.get("step_ms") is not None
            speed = f"{base['step_ms'] / v['step_ms']:.3f}x" if ok and base else "—"
            vs_ref = f"{ref['step_ms'] / v['step_ms']:.2f}x" if ok and ref else "—"
            note = "" if v["status"] == "ok" else f"{v['status']}: {v['note']}"
            lines.append(f"| {v['model']} | {v['variant']} | {_f(v.get('images_per_s'), '.0f')} | "
                         f"{_f(v.get('mfu') and 100 * v['mfu'], '.1f')} | {speed} | {vs_ref} | {note} |")
    failed = [r for r in rows if r["status"] not in ("ok", "skipped")]
    if failed:
        why = [f"{r['impl']} {r['model']} {r['mode']} {r['variant']}: {r['status']} "
               f"({r['note'].split(';')[0]})" for r in failed]
        lines += ["", "Rows without a number: " + "; ".join(why) + "."]
    profiles = [r["extra"]["profile"] for r in rows if r.get("extra", {}).get("profile")]
    if profiles:
        lines += ["", "Where the time of our compiled step goes (PyTorch profiler, ms per step; wall "
                  "includes profiler overhead):", "",
                  "| row | wall ms | kernel ms | kernels | by category (ms) |", "|---|---:|---:|---:|---|"]
        for p in profiles:
            cats = ", ".join(f"{k} {v:.1f}" for k, v in p["by_category_ms"].items())
            lines.append(f"| {p['label']} | {p['wall_ms_per_step']:.1f} | {p['kernel_ms_per_step']:.1f} | "
                         f"{p['kernels_per_step']:.0f} | {cats} |")
    return "\n".join(lines)


def mfu_plot(data: dict, path: Path) -> Path | None:
    """Compiled MFU by model size, ours and the reference."""
    import matplotlib  # noqa: PLC0415 - only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    pairs = [(r, ref) for r, ref in _ours_and_ref(data["rows"]) if r["input"] == "latent"]
    if not pairs:
        return None
    names = [r["model"] for r, _ in pairs]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(names, [100 * r["mfu"] for r, _ in pairs], "o-", label="difftools (default, compiled)")
    refs = [(n, 100 * ref["mfu"]) for n, (_, ref) in zip(names, pairs, strict=True) if ref]
    if refs:
        ax.plot([n for n, _ in refs], [m for _, m in refs], "s--", label="facebookresearch/DiT (compiled)")
    ax.set_ylabel(f"MFU % (vs {data['meta'].get('peak_tflops', 790):.0f} TFLOP/s)")
    ax.set_title(f"DiT training step, {data['meta'].get('device_name', '')}", fontsize=9)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trainer_block(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    lines = [f"Measured on {_origin(meta)}. {meta['data']} ({meta['split']} split), batch {meta['batch']}, "
             f"{meta['steps']} steps, compile={meta['compile']}; img/s = mean of the log windows after the "
             "first. `graph replay ms` = the captured step replayed back to back (GPU time with no host in "
             "the way); bound by GPU when the trainer's step is within 10 % of it.", "",
             "| model | configuration | img/s | MFU % | vs loader | step ms | graph replay ms | bound by |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    about = {"loader": "DataLoader + eager step (before)", "device_data": "device batches, eager step",
             "graphs": "device batches + whole step as one CUDA graph"}
    for r in rows:
        if r.get("img_per_s") is None:
            lines.append(f"| {r['model']} | {about.get(r['config'], r['config'])} | — | — | — | — | — | "
                         f"{r['status']}: {r.get('note', '')} |")
            continue
        base = next((x for x in rows if x["model"] == r["model"] and x["config"] == "loader"
                     and x.get("img_per_s")), None)
        g = r.get("graph_ms")
        bound = "—" if not g else ("GPU" if r["step_ms"] < 1.1 * g else f"host (+{r['host_ms']:.1f} ms)")
        vs = f"**{r['img_per_s'] / base['img_per_s']:.2f}x**" if base else "—"
        lines.append(f"| {r['model']} | {about.get(r['config'], r['config'])} | {r['img_per_s']:.0f} | "
                     f"{_f(r.get('mfu') and 100 * r['mfu'], '.1f')} | {vs} | {r['step_ms']:.2f} | "
                     f"{_f(g, '.2f')} | {bound} |")
    return "\n".join(lines)


def sampling_block(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    lines = [f"Measured on {_origin(meta)}. {meta['sampler']}, {meta['steps']} steps + the final denoising "
             f"step = {meta['nfe']} NFE, CFG {meta['cfg']} batched into one call (the network sees 2 x "
             f"batch), {meta['precision']}, per-image seeds.", "",
             "| model | variant | batch | img/s | vs eager | set-up s | 50,000 images "
             "| mean abs diff vs eager |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    about = {"eager": "eager loop (samplers.sample, step by step)", "graph": "CUDA graph",
             "compiled_graph": "compiled + CUDA graph (GraphedSampler)"}
    for r in rows:
        name = about.get(r["variant"], r["variant"])
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {name} | — | — | — | — | {r.get('status')}: {r.get('note', '')} "
                         "| — |")
            continue
        eager = next((x for x in rows if x["model"] == r["model"] and x["variant"] == "eager"
                      and x.get("img_per_s")), None)
        vs = f"**{r['img_per_s'] / eager['img_per_s']:.2f}x**" if eager else "—"
        wall = f"{r['eval_50k_s']:.0f} s ({r['eval_50k_kind']})"
        lines.append(f"| {r['model']} | {name} | {r['batch']} | {r['img_per_s']:.0f} | {vs} | "
                     f"{r['setup_s']:.1f} | {wall} | {_f(r.get('mean_abs_diff_vs_eager'), '.3f')} |")
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str, where: Path) -> str:
    pattern = re.compile(rf"(<!-- bench_report:{name} -->\n).*?(<!-- /bench_report:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{where}: no '<!-- bench_report:{name} -->' ... '<!-- /bench_report:{name} -->' "
                         "markers to fill")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main(argv=None):
    args = parse_args(argv)
    blocks = {}
    train = _load(args.train, "bench_train.json")
    if train is not None:
        blocks["train"] = train_block(train)
        if args.img is not None:
            plot = mfu_plot(train, args.img / "mfu_by_size.png")
            if plot is not None:
                rel = Path("img") / plot.name
                blocks["train"] += f"\n\n![MFU by model size]({rel.as_posix()})"
    trainer = _load(args.trainer, "bench_trainer.json")
    if trainer is not None:
        blocks["trainer"] = trainer_block(trainer)
    sampling = _load(args.sampling, "bench_sampling.json")
    if sampling is not None:
        blocks["sampling"] = sampling_block(sampling)
    if args.docs is None:
        for name, body in blocks.items():
            print(f"<!-- {name} -->\n{body}\n")
        return blocks
    text = args.docs.read_text()
    for name, body in blocks.items():
        text = replace_block(text, name, body, args.docs)
    args.docs.write_text(text)
    print(f"updated {', '.join(blocks) or 'nothing'} in {args.docs}")
    return blocks


if __name__ == "__main__":
    main()
