"""The benchmark table: markdown (with the variants' speed-ups and the profile summary) and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from difftools.benchmark.train_step import PEAK_TFLOPS, VARIANTS, Row, resolve_variant


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
