"""Which checkpoints are known good: vetted by the step that trained on them.

Checkpoint ``step_k`` holds the weights after update k. The first loss computed with those
weights is the loss of step k + 1, so only step k + 1 can show that they are usable: a run whose
update k blew the weights up still writes a finite-looking ``step_k`` and fails one step later.
A checkpoint is *vetted* when its weights were finite at writing time (the trainer never writes
others) and step k + 1 had a finite loss and gradient norm (and no loss spike, where that check
is on).

``<run>/checkpoints/vetted`` is a one-line pointer (like ``latest``) to the newest vetted
checkpoint, kept so that a resumed run still knows it. ``latest`` keeps naming the newest
complete checkpoint (what a killed run resumes from); when a run stops because it diverged,
``latest`` is moved to the vetted one (or removed when there is none), so that
``trainer.resume=auto`` continues from weights that are known to train.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from difftools import checkpoint as ckpt_io

log = logging.getLogger("difftools.train")

VETTED_FILE = "vetted"
_STEP_NAME = re.compile(r"step_(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """k of a ``step_k`` directory name, None for other names."""
    m = _STEP_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


class CheckpointVetting:
    """Tracks the checkpoints written (or resumed from) in this process until a step vets them.

    Args:
        root: the run's ``checkpoints/`` directory (pointer files live here).
        writer: whether this process writes the pointer files (the main process).
    """

    def __init__(self, root: str | Path, writer: bool = True):
        self.root, self.writer = Path(root), writer
        self.pending: dict[int, Path] = {}  # step -> checkpoint waiting for step + 1
        self.vetted: Path | None = None
        self.vetted_step = -1

    # ------------------------------------------------------------------ bookkeeping
    def start(self, step: int, resumed_from: Path | None) -> None:
        """Take over the run's ``vetted`` pointer (when it is on this run's trajectory, i.e. not
        newer than the resumed step) and queue the resumed checkpoint for vetting."""
        pointer = self.root / VETTED_FILE
        if pointer.is_file():
            name = pointer.read_text().strip()
            path = self.root / name
            k = checkpoint_step(path)
            if k is not None and k <= step and path.is_dir():
                self.vetted, self.vetted_step = path, k
        if resumed_from is not None:
            if self.vetted is not None and Path(resumed_from).resolve() == self.vetted.resolve():
                return
            self.pending[step] = Path(resumed_from)

    def saved(self, step: int, path: Path) -> None:
        """A checkpoint of the weights after update ``step`` was written (finite weights)."""
        self.pending[step] = Path(path)

    def observe(self, first_step: int, ok: list[bool]) -> None:
        """Per-step verdicts of steps ``first_step ..``; vets the checkpoints they trained on.

        ``ok`` may be shorter than the window (it ends before a stopping step); a pending
        checkpoint whose next step is not covered stays pending."""
        for k in sorted(self.pending):
            i = k + 1 - first_step
            if i < 0:  # its next step was judged in an earlier window (and was not ok)
                del self.pending[k]
            elif i < len(ok):
                path = self.pending.pop(k)
                if ok[i]:
                    self._set_vetted(k, path)

    def protected(self) -> list[Path]:
        """Checkpoints that pruning must keep."""
        return [self.vetted] if self.vetted is not None else []

    def _set_vetted(self, step: int, path: Path) -> None:
        if step < self.vetted_step:
            return
        self.vetted, self.vetted_step = path, step
        if self.writer and path.parent.resolve() == self.root.resolve() and self.root.is_dir():
            with ckpt_io.atomic_file(self.root / VETTED_FILE) as tmp:
                tmp.write_text(path.name + "\n")

    # ------------------------------------------------------------------ on a stop
    def fall_back(self) -> tuple[Path | None, list[Path]]:
        """Point ``latest`` at the newest vetted checkpoint (remove it when there is none).

        Returns the vetted checkpoint and the newer, not vetted checkpoints of this run."""
        steps = {p: checkpoint_step(p) for p in self.root.glob("step_*") if p.is_dir()}
        unvetted = sorted((p for p, k in steps.items() if k is not None and k > self.vetted_step),
                          key=steps.get)
        if self.writer:
            pointer = self.root / ckpt_io.LATEST_FILE
            if self.vetted is not None and self.vetted.parent.resolve() == self.root.resolve():
                ckpt_io.write_latest(self.root, self.vetted.name)
            elif pointer.is_file():
                pointer.unlink()
                log.warning("removed %s: no checkpoint of this run is vetted, so trainer.resume=auto starts "
                            "from scratch", pointer)
        return self.vetted, unvetted
