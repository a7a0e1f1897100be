"""The decision rule for float8 training (docs/benchmarks.md section 6), fixed before the GPU runs.

Inputs: ``bench_train.json`` of ``scripts/bench_train.py`` with the ``default`` and ``fp8`` rows of
DiT-L/2 (and DiT-XL/2), and the run directories of three 2,000-step trainings of the same DiT-L/2
configuration: bf16 with seed 0 (A), bf16 with seed 1 (B) and ``trainer.fp8=tensorwise`` with seed 0
(F). F shares A's initial weights, data order and noise, so F - A is what the fp8 matmuls change;
B - A is what a different seed changes, the run-to-run noise a user lives with anyway.

Rule, on the losses logged every ``log_every`` steps (each the mean over its window), at the logged
steps from ``from_step`` (500: past warm-up and the fast initial drop) to the last step all three runs
logged (at least ``min_last_step``, else the verdict is inconclusive):

* seed gap = mean |L_B - L_A|, fp8 gap = mean |L_F - L_A|;
* within the spread: fp8 gap <= seed gap, and F's last logged loss <= the larger of A's and B's;
* faster: the bench's fp8 step is at least ``min_speedup`` (1.03, three times the ~1 % run-to-run
  spread of the bench's step times) faster than the default step on DiT-L/2;
* ship (``trainer.fp8`` stays, opt-in, with these numbers in the docs) if faster and within the
  spread; otherwise ``trainer.fp8`` is removed from the trainer and ``conf/`` (``difftools.nn.fp8``
  and the bench variants stay, so it can be measured again).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_losses(run_dir: str | Path) -> dict[int, float]:
    """{logged step: mean loss of its window} from a run's ``metrics.jsonl`` (other records, such as
    evaluations or divergence events, are skipped; a step logged twice, e.g. by a resumed run, keeps
    the later value). FileNotFoundError naming the file if the run wrote none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} the run directory of a training run?")
    losses = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not a JSON record ({err})") from None
        if "loss" in record and "step" in record:
            losses[int(record["step"])] = float(record["loss"])
    return losses


def bench_speedups(bench_json: str | Path, variant: str = "fp8") -> dict[str, float]:
    """{model: default step ms / ``variant`` step ms} for every model with both rows timed ("ok") in a
    ``bench_train.json`` (ours, compiled)."""
    rows = json.loads(Path(bench_json).read_text())["rows"]
    ms: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["impl"] == "difftools" and r["mode"] == "compile" and r["status"] == "ok" and r["step_ms"]:
            ms[(r["model"], r["variant"])] = r["step_ms"]
    return {model: base / ms[(model, variant)] for (model, v), base in ms.items()
            if v == "default" and (model, variant) in ms}


@dataclass
class Fp8Verdict:
    steps: list[int]                 #: the logged steps compared
    seed_gap: float                  #: mean |L_B - L_A| over them
    fp8_gap: float                   #: mean |L_F - L_A|
    last: dict[str, float]           #: the last compared step's loss of A, B and F
    speedup: float | None            #: DiT-L/2 default step ms / fp8 step ms (None: not timed)
    faster: bool
    within_spread: bool
    ship: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        span = (f"steps {self.steps[0]}-{self.steps[-1]} ({len(self.steps)} logged)" if self.steps
                else "no steps")
        speed = "not timed" if self.speedup is None else f"{self.speedup:.3f}x"
        verdict = "SHIP (keep trainer.fp8 opt-in)" if self.ship else "DO NOT SHIP (remove trainer.fp8)"
        lines = [f"compared {span}: seed gap {self.seed_gap:.5f}, fp8 gap {self.fp8_gap:.5f}; last losses "
                 + ", ".join(f"{k} {v:.5f}" for k, v in self.last.items()),
                 f"fp8 speed-up on DiT-L/2: {speed}", f"verdict: {verdict}"]
        return "\n".join(lines + [f"  - {r}" for r in self.reasons])


def decide(bf16_a: dict[int, float], bf16_b: dict[int, float], fp8: dict[int, float],
           speedup: float | None, *, from_step: int = 500, min_last_step: int = 1500,
           min_speedup: float = 1.03) -> Fp8Verdict:
    """The module docstring's rule on the three loss curves ({step: loss}) and the bench speed-up."""
    steps = sorted(k for k in set(bf16_a) & set(bf16_b) & set(fp8) if k >= from_step)
    reasons = []
    if not steps or steps[-1] < min_last_step:
        reached = steps[-1] if steps else None
        reasons.append(f"inconclusive: the three runs share logged steps only up to {reached} "
                       f"(need >= {min_last_step})")
        return Fp8Verdict(steps, math.nan, math.nan, {}, speedup, False, False, False, reasons)
    seed_gap = sum(abs(bf16_b[k] - bf16_a[k]) for k in steps) / len(steps)
    fp8_gap = sum(abs(fp8[k] - bf16_a[k]) for k in steps) / len(steps)
    last = steps[-1]
    ends = {"bf16 seed 0": bf16_a[last], "bf16 seed 1": bf16_b[last], "fp8 seed 0": fp8[last]}
    gap_ok = fp8_gap <= seed_gap
    end_ok = fp8[last] <= max(bf16_a[last], bf16_b[last])
    within = gap_ok and end_ok
    if not gap_ok:
        reasons.append(f"fp8 gap {fp8_gap:.5f} > seed gap {seed_gap:.5f}: fp8 moves the curve more than "
                       "another seed does")
    if not end_ok:
        reasons.append(f"fp8's loss at step {last} ({fp8[last]:.5f}) is above both bf16 seeds'")
    faster = speedup is not None and speedup >= min_speedup
    if not faster:
        reasons.append("fp8 step not timed on DiT-L/2" if speedup is None
                       else f"fp8 speed-up {speedup:.3f}x < {min_speedup}x")
    return Fp8Verdict(steps, seed_gap, fp8_gap, ends, speedup, faster, within, faster and within, reasons)
