"""scripts/gpu_dryrun.sh: what a device call would lose is reported before the call is made."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                                reason="needs a git checkout")


def dryrun(tmp_path, carry: str, command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRYRUN_DIR": str(tmp_path)}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_dryrun.sh"), "t", carry, command], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_outputs_that_would_not_come_back_are_named(tmp_path):
    r = dryrun(tmp_path, "", 'mkdir -p $OUT/a/b/c; for i in 1 2 3 4 5 6 7 8; do echo $i > $OUT/f$i; done; '
                             'echo deep > $OUT/a/b/c/x.txt; test ! -e ../shared && test -f README.md')
    assert r.returncode == 0, r.stderr  # the tree is the checkout, without ../shared beside it
    assert "dryrun: $OUT holds 9 files" in r.stdout
    assert "WOULD NOT COME BACK: a/b/c/x.txt (more than 2 folders down)" in r.stdout
    assert "WOULD NOT COME BACK: 9 files (at most 8 come back" in r.stdout


def test_a_missing_carry_path_and_the_command_status(tmp_path):
    r = dryrun(tmp_path, "no/such/path", "true")
    assert r.returncode == 2 and "carry path no/such/path does not exist" in r.stderr
    r = dryrun(tmp_path, "", "exit 7")
    assert r.returncode == 7 and "dryrun t: exit 7" in r.stdout
