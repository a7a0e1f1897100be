"""The arms experiment of docs/mcd.md (masked consistency distillation vs SDTT vs extra MDLM training).

    python scripts/mcd_experiment.py --preset cpu --out runs/mcd_cpu
    python scripts/mcd_experiment.py --preset gpu --out runs/mcd_gpu --time-limit 540   # repeat until done

Each invocation does what is left (teacher, judge, teacher evaluation, every arm x seed x round with its
evaluation) within ``--time-limit`` seconds, saving as it goes, and exits 0 when everything is done
(summary.md, arms.png written) or 3 when it stopped at the time limit (run the same command again).
``--set key=json`` overrides a field of the preset (difftools.discrete.experiment.ExperimentConfig),
e.g. ``--set seeds=[0,1,2] --set steps_per_round=2000``; the overrides must be the same on every call.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from difftools.discrete.experiment import PRESETS, Experiment, ExperimentConfig, summarise

NOT_DONE = 3


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value (value in JSON, e.g. seeds=[0,1])")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string, e.g. teacher_mode=frozen
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, required=True,
                        help="experiment directory (created; reused to resume)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for this invocation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a preset field")
    parser.add_argument("--summary-only", action="store_true", help="rewrite summary.md / arms.png and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = ExperimentConfig.from_dict({**asdict(PRESETS[args.preset]), **parse_overrides(args.set)})
    saved = args.out / "experiment.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(cfg))):
        print(f"error: {saved} was written with another configuration; use the same --preset/--set as the "
              "first call, or another --out", file=sys.stderr)
        return 2
    if args.summary_only:
        print(summarise(args.out, cfg).read_text())
        return 0
    done = Experiment(cfg, args.out).run(args.time_limit)
    if not done:
        print(f"stopped at the time limit; run the same command again to continue ({args.out})")
        return NOT_DONE
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
