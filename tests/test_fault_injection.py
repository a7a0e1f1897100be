"""Fault injection: SIGKILL a real `train/dit.py` run at random points, resume it with
trainer.resume=auto each time, and require the same per-step losses and final weights as a run
that was never interrupted (CPU, no data-loader workers: bit for bit)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difftools import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
# tiny model, a checkpoint every step (so that kills often land inside a checkpoint write), a
# metrics record every step (the per-step losses to compare)
ARGS = [f"trainer.max_steps={MAX_STEPS}", "trainer.batch_size=16", "trainer.log_every=1",
        "trainer.ckpt_every=1", "trainer.keep_last=2", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.sample_every=0", "trainer.sample_num=4", "trainer.sample_steps=1", "trainer.num_workers=0",
        "trainer.device=cpu", "eval.enabled=false", "model.hidden_size=32", "model.depth=1"]
KILLS = 3  # each costs one process start (~6 s on 2 idle cores)
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train" / "dit.py"), f"hydra.run.dir={run_dir}", *ARGS, *extra]


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(s) for s in lines if s.endswith("}")]  # a kill may cut the last line


def _max_step(run_dir: Path) -> int:
    return max((r["step"] for r in _records(run_dir)), default=0)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(_command(straight), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {r["step"]: r for r in _records(straight)}
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))

    run = tmp_path / "killed"
    rng = random.Random(11)
    kills = 0
    for _ in range(KILLS):
        start = _max_step(run)
        target = start + rng.randint(1, 2)
        proc = subprocess.Popen(_command(run, "trainer.resume=auto"), cwd=tmp_path, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while _max_step(run) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))  # somewhere in the next step or checkpoint write
            proc.kill()
        finally:
            proc.wait()
        kills += proc.returncode == -9
    assert kills == KILLS  # every kill hit a running process, not a finished one

    final = subprocess.run(_command(run, "trainer.resume=auto"), cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    records = [r for r in _records(run) if "event" not in r]
    assert {r["step"] for r in records} == set(expected)
    # every step's record, also those of steps redone after a kill, equals the uninterrupted run's
    for r in records:
        for key in ("loss", "loss_mse", "grad_norm", "lr"):
            assert r[key] == expected[r["step"]][key], (r["step"], key)
    for name in ("model.safetensors", "ema.safetensors"):
        a = ckpt_io.load_weights(straight / "checkpoints" / f"step_{MAX_STEPS:07d}" / name)
        b = ckpt_io.load_weights(run / "checkpoints" / f"step_{MAX_STEPS:07d}" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert ckpt_io.read_latest(run / "checkpoints").name == f"step_{MAX_STEPS:07d}"
    assert not (run / "run.lock").exists()
