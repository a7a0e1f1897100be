"""The benchmark plumbing that decides what the docs say: bench_train's row order and batches, and
scripts/bench_report.py turning benchmark JSON into the docs' tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from difftools.benchmark.plan import plan

REPO = Path(__file__).resolve().parents[1]


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "scripts" / "bench_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(impl, model, step_ms, mode="compile", variant="default", batch=0, status="ok", mfu=0.4):
    return dict(impl=impl, model=model, input="latent", backend="sdpa" if impl == "difftools" else "timm",
                mode=mode, variant=variant, batch=batch, status=status, note="", step_ms=step_ms,
                images_per_s=None if step_ms is None else 256_000 / step_ms, mfu=mfu, extra={})


def test_plan_puts_the_headline_comparison_first_and_gives_big_models_their_batch():
    combos = plan(impls=["difftools", "reference"], models=["DiT-B/2", "DiT-XL/2", "DiT-T/2"],
                  inputs=["latent"], modes=["compile", "eager"], main_model="DiT-B/2", main_input="latent",
                  backend_rows=[],
                  variants=["torchnorm"], have_reference=True, variant_models=["DiT-B/2", "DiT-XL/2"],
                  eager_models=["DiT-B/2"], batch_for=lambda m: 128 if m == "DiT-XL/2" else 0)
    keys = [c.key() for c in combos]
    assert keys[:5] == ["difftools DiT-B/2 latent sdpa compile default",
                        "reference DiT-B/2 latent timm compile default",
                        "difftools DiT-XL/2 latent sdpa compile default b128",
                        "reference DiT-XL/2 latent timm compile default b128",
                        "difftools DiT-B/2 latent sdpa compile torchnorm"]
    assert keys[-2:] == ["difftools DiT-B/2 latent sdpa eager default",
                         "reference DiT-B/2 latent timm eager default"]
    assert not any("DiT-T/2" in k and "eager" in k for k in keys)  # eager rows only for --eager-models


def test_train_block_ratios_variants_and_failures():
    report = load_report()
    data = {"meta": dict(batch=256, image_size=32, dtype="bf16 autocast", optimizer="fused AdamW", ema=True,
                         warmup=3, steps=15, device_name="NVIDIA H100", torch="2.11", date="2026-12-07",
                         command="scripts/bench_train.py --reference .gpu/ref_dit"),
            "rows": [row("difftools", "DiT-B/2", 80.0), row("reference", "DiT-B/2", 100.0, mfu=0.32),
                     row("difftools", "DiT-B/2", 90.0, variant="torchnorm"),
                     row("difftools", "DiT-XL/2", 200.0, batch=128),
                     row("reference", "DiT-XL/2", None, batch=128, status="OOM")]}
    text = report.train_block(data)
    assert "| DiT-B/2 | latent | compile | 256 | 3200 | 40.0 | 2560 | 32.0 | **1.25x** |" in text
    assert "| DiT-XL/2 | latent | compile | 128 | 1280 | 40.0 | — | — | — |" in text
    assert "| DiT-B/2 | torchnorm | 2844 | 40.0 | 0.889x | 1.11x |  |" in text  # 80/90, 100/90
    assert "reference DiT-XL/2 compile default: OOM" in text
    assert "NVIDIA H100, torch 2.11, 2026-12-07" in text


def test_docs_blocks_are_replaced_between_their_markers(tmp_path):
    report = load_report()
    out = tmp_path / "sampling"
    out.mkdir()
    meta = dict(sampler="dpmpp_2m", steps=19, nfe=20, cfg=1.5, precision="bf16", device_name="H200",
                torch="2.11", date="d", command="c")
    rows = [dict(model="m", variant="eager", batch=500, status="ok", img_per_s=1000.0, setup_s=1.0,
                 eval_50k_s=51.0, eval_50k_kind="extrapolated"),
            dict(model="m", variant="compiled_graph", batch=500, status="ok", img_per_s=3000.0, setup_s=30.0,
                 eval_50k_s=47.0, eval_50k_kind="measured", mean_abs_diff_vs_eager=0.2),
            dict(model="m", variant="graph", status="error", note="RuntimeError: capture failed")]
    (out / "bench_sampling.json").write_text(json.dumps(dict(meta=meta, rows=rows)))
    docs = tmp_path / "bench.md"
    docs.write_text("intro\n<!-- bench_report:sampling -->\nold table\n"
                    "<!-- /bench_report:sampling -->\nend\n")
    report.main(["--sampling", str(out), "--docs", str(docs)])
    text = docs.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("end\n")
    fast = ("| m | compiled + CUDA graph (GraphedSampler) | 500 | 3000 | **3.00x** | 30.0 | 47 s (measured) "
            "| 0.200 |")
    assert fast in text
    assert "| m | CUDA graph | — | — | — | — | error: RuntimeError: capture failed | — |" in text
    docs.write_text("no markers here\n")
    with pytest.raises(ValueError, match="no '<!-- bench_report:sampling -->'"):
        report.main(["--sampling", str(out), "--docs", str(docs)])
    with pytest.raises(FileNotFoundError, match="bench_trainer.json not found"):
        report.main(["--trainer", str(out)])


# ------------------------------------------------------------------ the float8 decision (benchmarks.md 6)
def _curve(run_dir: Path, losses: dict[int, float], extra: list[dict] = ()) -> Path:
    run_dir.mkdir(parents=True)
    records = [{"step": k, "loss": v, "img_per_s": 700.0} for k, v in sorted(losses.items())] + list(extra)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def _decaying(offset: float, last: int = 2000) -> dict[int, float]:
    return {k: 0.3 + 0.5 / (1 + k / 200) + offset for k in range(50, last + 1, 50)}


def test_fp8_rule_ships_only_when_faster_and_within_the_seed_spread():
    from difftools.benchmark.fp8_verdict import decide

    a, b = _decaying(0.0), _decaying(0.004)  # seed gap 0.004
    ok = decide(a, b, _decaying(0.001), speedup=1.2)
    assert ok.ship and ok.faster and ok.within_spread and ok.reasons == []
    assert ok.steps[0] == 500 and ok.steps[-1] == 2000 and len(ok.steps) == 31
    assert abs(ok.seed_gap - 0.004) < 1e-12 and abs(ok.fp8_gap - 0.001) < 1e-12
    wide = decide(a, b, _decaying(0.006), speedup=1.2)  # above both seeds everywhere
    assert not wide.ship and wide.faster and not wide.within_spread
    assert any("fp8 gap 0.00600 > seed gap 0.00400" in r for r in wide.reasons)
    assert any("above both bf16 seeds'" in r for r in wide.reasons)
    late = dict(_decaying(-0.003))
    late[2000] = a[2000] + 0.005  # close on average, worse than both seeds at the end
    assert not decide(a, b, late, speedup=1.2).ship
    slow = decide(a, b, _decaying(0.001), speedup=1.02)
    assert not slow.ship and slow.within_spread and slow.reasons == ["fp8 speed-up 1.020x < 1.03x"]
    assert decide(a, b, _decaying(0.001), speedup=None).reasons == ["fp8 step not timed on DiT-L/2"]
    short = decide(a, b, _decaying(0.001, last=1000), speedup=1.2)
    assert not short.ship and short.reasons == [
        "inconclusive: the three runs share logged steps only up to 1000 (need >= 1500)"]


def test_fp8_verdict_script_reads_the_runs_and_the_bench(tmp_path, capsys):
    from difftools.benchmark.fp8_verdict import read_losses

    a = _curve(tmp_path / "bf16_s0", _decaying(0.0), extra=[{"step": 2000, "eval/fd": 3.0}])
    b = _curve(tmp_path / "bf16_s1", _decaying(0.004))
    # a step logged twice (a resumed run): the later record counts
    f = _curve(tmp_path / "fp8_s0", _decaying(0.002), extra=[{"step": 2000, "loss": 0.5}])
    assert read_losses(f)[2000] == 0.5 and len(read_losses(a)) == 40
    with pytest.raises(FileNotFoundError, match="nowhere/metrics.jsonl does not exist"):
        read_losses(tmp_path / "nowhere")
    bench = tmp_path / "bench_train.json"
    bench.write_text(json.dumps({"meta": {}, "rows": [
        row("difftools", "DiT-L/2", 200.0), row("difftools", "DiT-L/2", 160.0, variant="fp8"),
        row("difftools", "DiT-L/2", 190.0, variant="fp8row"), row("difftools", "DiT-XL/2", 300.0),
        row("difftools", "DiT-XL/2", None, variant="fp8", status="not run")]}))
    spec = importlib.util.spec_from_file_location("fp8_verdict_script", REPO / "scripts" / "fp8_verdict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out_json = tmp_path / "verdict.json"
    assert script.main(["--bench", str(bench), "--bf16", str(a), str(b), "--fp8", str(f),
                        "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "DiT-L/2 fp8: 1.250x the default step" in printed and "DiT-L/2 fp8row: 1.053x" in printed
    assert "DiT-XL/2 fp8" not in printed  # its fp8 row was not timed
    # fp8's last window (0.5) is above both seeds: not within the spread, however fast
    assert "verdict: DO NOT SHIP (remove trainer.fp8)" in printed
    saved = json.loads(out_json.read_text())
    assert saved["speedup"] == 1.25 and saved["ship"] is False and saved["speedups"]["fp8row"]["DiT-L/2"] > 1
