"""One training run per run directory: a lock file ``<run>/run.lock``.

Two runs writing into one directory interleave their checkpoints, ``latest`` pointers and
metrics, and one usually crashes on the other's temporary files. The first run to start creates
``run.lock`` (JSON: pid, host, start time, command line, a random token); a second one is refused
with :class:`RunDirLockedError` naming the directory and the holder. The file appears atomically
with its full content (written to a temporary name, then hard-linked into place, which fails
when the lock exists), and is removed when the holder ends, also on an exception
(``try/finally`` and ``atexit``).

A lock whose holder was killed (``kill -9``, out of memory, a lost node) stays behind. It is
*stale*, and taken over with a warning, when it was written on this host and its pid is no longer
running (or is this very process, which does not hold it: a restarted container reuses pids). A
lock from another host cannot be checked from here: the message says to delete the file when
that run is gone.

With Hydra (``train/dit.py``), :class:`HydraRunDirLock` takes the lock in Hydra's ``on_run_start``
callback, before Hydra writes ``.hydra/``, so a refused second run leaves the first run's
``.hydra/config.yaml`` untouched. Under ``accelerate launch`` only rank 0 takes it.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("difftools.train")

LOCK_FILE = "run.lock"

_HELD: dict[Path, RunDirLock] = {}  # run dir (resolved) -> lock held by this process


class RunDirLockedError(RuntimeError):
    """Another training run holds this run directory."""


def _create_exclusive(tmp: Path, path: Path, content: str) -> None:
    """Create ``path`` with ``content``; FileExistsError when it exists. A hard link of the finished
    ``tmp`` makes the file appear complete; where the file system has no hard links, an exclusive
    create followed by the write (a reader may then briefly see it empty)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError:  # e.g. EPERM / ENOTSUP: no hard links here
        pass
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(content)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunDirLock:
    """The lock on one run directory; :meth:`acquire` / :meth:`release`, or use as a context manager."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.path = self.run_dir / LOCK_FILE
        self.token: str | None = None

    # ------------------------------------------------------------------ holder
    def holder(self) -> dict | None:
        """The lock file's content, None when there is no lock, {} when it is unreadable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    @staticmethod
    def describe(info: dict) -> str:
        return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')} "
                f"({info.get('command', '?')})")

    def _is_stale(self, info: dict) -> bool:
        if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
            return False
        if info["pid"] == os.getpid():  # our pid, but not our lock: a previous process that had it
            return self.run_dir not in _HELD
        return not _pid_alive(info["pid"])

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> RunDirLock:
        """Create the lock; take over a stale one (with a warning); else raise RunDirLockedError."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?",
                "token": token}
        content = json.dumps(info) + "\n"
        tmp = self.run_dir / f".{LOCK_FILE}.{token}"
        tmp.write_text(content)
        try:
            for _ in range(3):  # a stale lock can be taken over; a second try sees the new state
                try:
                    _create_exclusive(tmp, self.path, content)
                except FileExistsError:
                    held = self.holder()
                    if held is None:  # released between our link and our read
                        continue
                    if held and self._is_stale(held):
                        self._take_over(held)
                        continue
                    raise RunDirLockedError(self._refusal(held)) from None
                self.token = token
                _HELD[self.run_dir] = self
                atexit.register(self.release)
                return self
            raise RunDirLockedError(self._refusal(self.holder() or {}))
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: dict) -> None:
        """Remove a stale lock, making sure it is the one judged stale (a concurrent starter may
        have replaced it in between)."""
        aside = self.run_dir / f".{LOCK_FILE}.stale.{uuid.uuid4().hex}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = {}
        if moved.get("token") != stale.get("token"):  # not the stale one: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("taking over the stale lock %s of %s: that process is no longer running (killed?)",
                        self.path, self.describe(stale))
        aside.unlink(missing_ok=True)

    def _refusal(self, held: dict) -> str:
        if not held:
            return (f"run directory {self.run_dir} is locked by {self.path}, whose content is unreadable; "
                    "if no training run uses this directory, delete that file")
        return (f"run directory {self.run_dir} is in use by another training run: {self.describe(held)}. "
                f"Two runs in one directory would mix their checkpoints. Choose another directory "
                f"(hydra.run.dir=...) or wait for that run to end; if it is no longer running (e.g. it ran "
                f"on another machine), delete {self.path}")

    def release(self) -> None:
        """Remove the lock if this object still holds it (idempotent)."""
        if self.token is None:
            return
        held = self.holder()
        if held is not None and held.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        elif held is not None or self.run_dir.exists():
            log.warning("the lock %s was taken from this run (now %s); not removing it", self.path,
                        self.describe(held) if held else "absent")
        self.token = None
        if _HELD.get(self.run_dir) is self:
            del _HELD[self.run_dir]
        atexit.unregister(self.release)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_here(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds the lock on ``run_dir``."""
    return Path(run_dir).expanduser().resolve() in _HELD


@contextmanager
def hold_run_dir(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold the lock on ``run_dir`` for the block, unless this process already holds it (e.g. taken
    by :class:`HydraRunDirLock` before the run started) or ``enabled`` is false (non-main ranks)."""
    if not enabled or held_here(run_dir):
        yield
        return
    lock = RunDirLock(run_dir).acquire()
    try:
        yield
    finally:
        lock.release()


class HydraRunDirLock:
    """Hydra callback (``hydra.callbacks``; duck-typed, no Hydra import here) that locks
    ``hydra.run.dir`` before Hydra writes ``.hydra/`` into it, and unlocks it when the run ends
    (normally or with an exception).

    Hydra turns exceptions raised by callbacks into warnings, so a refusal exits the process
    (``SystemExit`` with the message, exit code 1) instead. Only rank 0 of a multi-process launch
    (environment ``RANK``) takes the lock. Multirun jobs (``-m``) are locked by the trainer itself,
    after Hydra wrote their ``.hydra/``.
    """

    def __init__(self):
        self.lock: RunDirLock | None = None

    def on_run_start(self, config, **kwargs) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        run_dir = config.hydra.run.dir
        if held_here(run_dir):
            return
        try:
            self.lock = RunDirLock(run_dir).acquire()
        except RunDirLockedError as err:
            raise SystemExit(f"error: {err}") from None

    def on_run_end(self, config, **kwargs) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # Hydra calls every hook of a callback; the lock needs only the two above.
    def on_job_start(self, config, **kwargs) -> None:
        pass

    def on_job_end(self, config, **kwargs) -> None:
        pass

    def on_multirun_start(self, config, **kwargs) -> None:
        pass

    def on_multirun_end(self, config, **kwargs) -> None:
        pass
