"""The run's log of numbers: ``<run>/metrics.jsonl`` and TensorBoard (``<run>/tb``).

One JSON object per line, always with ``step``: training windows (``loss``, ``lr``, ``grad_norm``,
throughput, the objective's logs), evaluations (``eval/<key>``) and events (``event``: why a run
stopped). TensorBoard gets the numeric fields of every record but events, tagged ``train/<key>``
(keys that already hold a ``/``, such as ``eval/fd``, keep their name). Only the main process
writes; a run without a directory writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and TensorBoard when ``tensorboard``)."""

    def __init__(self, out_dir: Path | None, tensorboard: bool = True, enabled: bool = True):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.tensorboard = tensorboard
        self.enabled = enabled and out_dir is not None
        self._writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard and "event" not in record:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out_dir / "tb"))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(k if "/" in k else f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
