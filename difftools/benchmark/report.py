"""The benchmark tables: markdown (headline ratios against the reference, every row with the reference
beside it, the variants' speed-ups, the profile summaries) and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from difftools.benchmark.train_step import PEAK_TFLOPS, VARIANTS, Row, resolve_variant


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _pct(mfu):
    return None if mfu is None else 100 * mfu


def reference_row(rows: list[Row], r: Row) -> Row | None:
    """The reference's row for the same model, input, mode and batch (its default, compiled or eager)."""
    c = r.combo
    return next((x for x in rows if x.combo.impl == "reference" and x.combo.model == c.model
                 and x.combo.input == c.input and x.combo.mode == c.mode and x.combo.batch == c.batch
                 and x.step_ms), None)


def headline(rows: list[Row], batch: int) -> list[str]:
    """Ours (default) vs the reference per model and mode, as issue 18 states its goals."""
    lines = ["| model | input | mode | batch | difftools img/s (MFU %) | reference img/s (MFU %) | ratio |",
             "|---|---|---|---:|---:|---:|---:|"]
    ours = [r for r in rows if r.combo.impl == "difftools" and r.combo.variant == "default"
            and r.combo.backend == "sdpa" and r.step_ms]
    for r in ours:
        ref = reference_row(rows, r)
        c = r.combo
        ref_cell = f"{ref.images_per_s:.0f} ({_pct(ref.mfu):.1f})" if ref else "—"
        ratio = f"**{ref.step_ms / r.step_ms:.2f}x**" if ref else "—"
        lines.append(f"| {c.model} | {c.input} | {c.mode} | {c.batch or batch} | "
                     f"{r.images_per_s:.0f} ({_pct(r.mfu):.1f}) | {ref_cell} | {ratio} |")
    return lines


def markdown(rows: list[Row], meta: dict, variant_names: list[str]) -> str:
    lines = [
        f"DiT training step, batch {meta['batch']} (unless the batch column says otherwise), "
        f"{meta['image_size']}x{meta['image_size']} input, {meta['dtype']}, {meta['optimizer']}"
        f"{', EMA update included' if meta.get('ema') else ''}; {meta['device_name']}; "
        f"torch {meta['torch']}; "
        f"MFU vs {PEAK_TFLOPS:.0f} TFLOP/s (training = 3 x forward FLOPs); loss: {meta['loss']}; "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps; total {meta.get('total_s', '?')} s"
        + (f"; depth overridden to {meta['depth']}" if meta.get("depth") else "")
        + ("" if meta.get("complete") else " (**partial**: the run was still going or was cut off)") + ".",
        "",
        "Ours (shipped default) against the reference in the same process (ratio = reference step time / "
        "ours):",
        "",
        *headline(rows, meta['batch']),
        "",
        "| impl | model | input | attention | mode | variant | batch | img/s | step ms | peak GB | MFU % "
        "| vs reference | compile s | warmup s | note |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    vorder = {v: i for i, v in enumerate(["default"] + variant_names)}
    key = lambda r: (r.combo.model, r.combo.input, r.combo.mode, r.combo.impl != "difftools",  # noqa: E731
                     r.combo.backend, vorder.get(r.combo.variant, 99))
    for r in sorted(rows, key=key):
        c = r.combo
        chw = f"{meta['image_size']}x{meta['image_size']}x{4 if c.input == 'latent' else 3}"
        note = r.note if r.status == "ok" else f"**{r.status}** {r.note}".strip()
        ref = reference_row(rows, r) if c.impl == "difftools" else None
        vs = f"{ref.step_ms / r.step_ms:.2f}x" if ref and r.step_ms else "—"
        lines.append(
            f"| {c.impl} | {c.model} | {c.input} {chw} | {c.backend} | {c.mode} | {c.variant} | "
            f"{c.batch or meta['batch']} | {fmt(r.images_per_s, '.0f')} | {fmt(r.step_ms, '.1f')} | "
            f"{fmt(r.peak_gb, '.1f')} | {fmt(_pct(r.mfu), '.1f')} | {vs} | {fmt(r.compile_s, '.0f')} | "
            f"{fmt(r.warmup_s, '.0f')} | {note} |"
        )
    compiled = [r for r in rows if r.combo.mode == "compile" and "compile_cache" in r.extra]
    if compiled:
        hits = sum(1 for r in compiled if r.extra["compile_cache"].get("autograd_cache_hit", 0) > 0)
        lines += ["", f"Compiled rows that reused the precompile workers' artifacts (AOTAutograd cache "
                  f"hit): {hits} of {len(compiled)}; the others compiled cold inside `warmup s`."]
    var_rows = [r for r in rows if r.combo.variant != "default"]
    if var_rows:
        lines += ["", "Variants of our compiled rows (speed-up = default step time / variant step time):", ""]
        lines.append(f"- default: {VARIANTS['default'].about}")
        for r in var_rows:
            c = r.combo
            base = next((x for x in rows if x.combo.impl == "difftools" and x.combo.variant == "default"
                         and x.combo.mode == "compile" and x.combo.backend == "sdpa"
                         and x.combo.model == c.model and x.combo.input == c.input
                         and x.combo.batch == c.batch and x.step_ms), None)
            speed = f"{base.step_ms / r.step_ms:.3f}x" if base and r.step_ms else "—"
            base_ms = fmt(base.step_ms if base else None, '.1f')
            lines.append(f"- {c.model} {c.variant}: {resolve_variant(c.variant).about}; "
                         f"{fmt(r.step_ms, '.1f')} ms (default {base_ms} ms), speed-up {speed}")
    for r in rows:
        prof = r.extra.get("profile")
        if prof:
            cats = ", ".join(f"{k} {v:.1f}" for k, v in prof["by_category_ms"].items())
            idle = prof["wall_ms_per_step"] - prof["kernel_ms_per_step"]
            lines += ["", f"Profile of {prof['label']} ({prof['steps']} steps, profiler on): "
                      f"{prof['wall_ms_per_step']:.1f} ms/step wall, {prof['kernel_ms_per_step']:.1f} ms in "
                      f"{prof['kernels_per_step']:.0f} kernels (outside kernels ~{idle:.1f} ms); "
                      f"by category, ms/step: {cats}."]
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
