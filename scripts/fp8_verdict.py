"""The float8 decision of docs/benchmarks.md section 6 from the GPU runs' outputs (runs anywhere).

    python scripts/fp8_verdict.py --bench OUT/bench_fp8/bench_train.json \
        --bf16 OUT/fp8_runs/bf16_s0 OUT/fp8_runs/bf16_s1 --fp8 OUT/fp8_runs/fp8_s0

Prints the speed-ups of every timed fp8 / fp8row row, the seed gap and fp8 gap of the loss curves and
the verdict of the rule fixed before the runs (:mod:`difftools.benchmark.fp8_verdict`); ``--json``
writes them too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's difftools

from difftools.benchmark.fp8_verdict import bench_speedups, decide, read_losses  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, required=True, help="bench_train.json with default and fp8 rows")
    p.add_argument("--bf16", type=Path, nargs=2, required=True, metavar=("SEED0", "SEED1"),
                   help="run directories of the two bf16 runs (seed 0 first)")
    p.add_argument("--fp8", type=Path, required=True, help="run directory of the fp8 run (seed 0)")
    p.add_argument("--model", default="DiT-L/2", help="the model the three runs trained")
    p.add_argument("--json", type=Path, default=None, help="also write the verdict here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    speedups = {v: bench_speedups(args.bench, v) for v in ("fp8", "fp8row")}
    for variant, by_model in speedups.items():
        for model, s in by_model.items():
            print(f"{model} {variant}: {s:.3f}x the default step")
    verdict = decide(read_losses(args.bf16[0]), read_losses(args.bf16[1]), read_losses(args.fp8),
                     speedups["fp8"].get(args.model))
    print(verdict.summary())
    if args.json is not None:
        args.json.write_text(json.dumps({"speedups": speedups, **asdict(verdict)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
