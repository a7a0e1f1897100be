"""One training run per run directory (difftools.training.lock)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from test_training import REPO, _isolated, _NaNAfter, make_trainer  # noqa: F401 (autouse fixture)

from difftools.training import NonFiniteLossError, RunDirLock, RunDirLockedError
from difftools.training.lock import LOCK_FILE

# A second process that holds the lock until its stdin closes. It loads lock.py by path: the
# module needs only the standard library, so the child starts in a fraction of a second.
_HOLDER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lock", {str(REPO / "difftools" / "training" / "lock.py")!r})
lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)
lock.RunDirLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _hold_in_child(run_dir) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _write_lock(run_dir, **info):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": 1, "host": socket.gethostname(), "started": "2026-01-01T00:00:00", "command": "x",
              "token": "t"}
    holder.update(info)
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def test_second_trainer_is_refused_and_a_killed_holder_is_taken_over(tmp_path, caplog):
    child = _hold_in_child(tmp_path)
    try:
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == child.pid and held["host"] == socket.gethostname() and held["started"]
        with pytest.raises(RunDirLockedError) as info:
            make_trainer(tmp_path, max_steps=2).train()
        msg = str(info.value)
        assert str(tmp_path) in msg and f"pid {child.pid} on host {socket.gethostname()}" in msg
        assert str(tmp_path / LOCK_FILE) in msg
        assert not (tmp_path / "checkpoints").exists()  # refused before writing anything
    finally:
        child.kill()  # SIGKILL: no cleanup, the lock file stays behind
        child.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == child.pid
    with caplog.at_level("WARNING", logger="difftools.train"):
        result = make_trainer(tmp_path, max_steps=2).train()
    assert result.step == 2 and f"taking over the stale lock {tmp_path / LOCK_FILE}" in caplog.text
    assert f"pid {child.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released after the run


def test_lock_is_released_after_an_exception(tmp_path):
    with pytest.raises(NonFiniteLossError):
        make_trainer(tmp_path, loss=_NaNAfter(bad_call=3)).train()
    assert not (tmp_path / LOCK_FILE).exists()
    RunDirLock(tmp_path).acquire().release()  # and it can be taken again


def test_same_process_second_lock_refused_and_release_is_idempotent(tmp_path):
    lock = RunDirLock(tmp_path).acquire()
    with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
        RunDirLock(tmp_path).acquire()
    lock.release()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_stale_lock_of_our_own_pid_is_taken_over(tmp_path):
    """A restarted container reuses pids: a lock naming this very pid that this process does not
    hold was left by a previous process."""
    _write_lock(tmp_path, pid=os.getpid())
    with RunDirLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token != "t"
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_from_another_host_or_unreadable_is_refused(tmp_path):
    _write_lock(tmp_path, pid=os.getpid(), host="elsewhere-node-7")
    with pytest.raises(RunDirLockedError, match=r"pid \d+ on host elsewhere-node-7 .*delete .*run\.lock"):
        RunDirLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).write_text("{not json")
    with pytest.raises(RunDirLockedError, match="unreadable; if no training run uses this directory, delete"):
        RunDirLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == "{not json"  # a refusal never touches the holder's file


def test_cli_refuses_a_locked_run_dir_before_hydra_writes_into_it(tmp_path):
    """Two `train/dit.py` into one hydra.run.dir: the second exits non-zero, names the directory and
    the holder, and leaves the first run's .hydra/ alone (the lock is taken before Hydra writes it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "train" / "dit.py"), f"hydra.run.dir={tmp_path}", "trainer.max_steps=1",
           "eval.enabled=false", "seed=1"]
    with RunDirLock(tmp_path):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    expected = f"error: run directory {tmp_path} is in use by another training run: pid {os.getpid()}"
    assert expected in proc.stderr
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "checkpoints").exists()


def test_lock_without_hard_links_still_excludes(tmp_path, monkeypatch):
    from difftools.training import lock as lock_mod

    def no_links(src, dst):
        raise PermissionError("EPERM: this file system has no hard links")

    monkeypatch.setattr(lock_mod.os, "link", no_links)
    with RunDirLock(tmp_path) as held:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == held.token
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
