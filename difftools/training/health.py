"""Training health: when a run must stop because it diverged.

The trainer keeps each step's loss and global gradient norm on the device and looks at them only
every ``log_every`` steps and before every checkpoint (one host sync per flush, none per step).
:class:`HealthMonitor` then judges the steps since the last flush, in order:

* a non-finite loss stops the run at once (:class:`NonFiniteLossError`);
* a non-finite gradient norm with a finite loss is an overflow in the backward pass. The optimizer
  already skipped that update on the device (see :func:`skip_flag`); up to ``nonfinite_patience``
  such steps in a row are tolerated, one more stops the run (:class:`DivergedError`);
* optional: a loss above ``divergence_factor`` times the median of the preceding
  ``divergence_window`` finite losses stops the run (off by default: the per-step loss of a
  diffusion model varies with the drawn t by a factor of a few, so only a large factor is safe);
* non-finite weights (model, EMA or loss-module parameters) after the last step stop the run,
  so a checkpoint never holds NaN/inf.

Each step also gets a verdict ``ok`` (finite loss and gradient norm, not diverged), which vets the
checkpoint written just before it (:mod:`difftools.training.vetting`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


class DivergedError(RuntimeError):
    """Training stopped because it diverged (non-finite loss, gradient norm or weights, or a loss
    spike); the message names the newest vetted checkpoint to resume from."""


class NonFiniteLossError(DivergedError):
    """The training loss became NaN or inf; the run stopped without writing anything after it."""


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor on the tensors' device: every floating-point entry is finite (no sync)."""
    flags = [t.isfinite().all() for t in tensors if t.is_floating_point() and t.numel()]
    if not flags:
        return torch.tensor(True)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def skip_flag(grad_norm: torch.Tensor) -> torch.Tensor:
    """``found_inf`` for a fused optimizer: 1.0 where the gradient norm is NaN/inf, else 0.0.

    A fused AdamW/Adam given this tensor (as ``optimizer.found_inf``, the hook ``GradScaler`` uses)
    leaves parameters, moments and its step count untouched when it is 1, on the device, without a
    host sync."""
    return (~torch.isfinite(grad_norm)).to(torch.float32).reshape(())


@dataclass
class Verdict:
    """What :meth:`HealthMonitor.check` found in one window of steps."""

    first_step: int
    ok: list[bool]                 #: per step: finite loss and grad norm, no divergence
    skipped: list[int] = field(default_factory=list)  #: steps whose update was skipped (tolerated)
    stop_kind: str | None = None   #: nonfinite_loss | nonfinite_grad_norm | nonfinite_weights | diverged
    stop_step: int | None = None
    reason: str = ""               #: one sentence for the error message

    @property
    def stop(self) -> bool:
        return self.stop_kind is not None


class HealthMonitor:
    """Judges windows of per-step losses and gradient norms; see the module docstring.

    Args:
        nonfinite_patience: consecutive steps with a non-finite gradient norm (and a finite loss)
            that are skipped and tolerated; one more stops the run. 0 = stop at the first one.
        divergence_factor: stop when a loss exceeds this multiple of the running median
            (0 = off).
        divergence_window: number of preceding finite per-step losses the median is taken over;
            the check starts once that many have been seen (in this process: after a resume it
            starts again).
    """

    def __init__(self, nonfinite_patience: int = 3, divergence_factor: float = 0.0,
                 divergence_window: int = 200):
        if nonfinite_patience < 0:
            raise ValueError(f"trainer.nonfinite_patience must be >= 0, got {nonfinite_patience}")
        if divergence_factor != 0 and divergence_factor <= 1:
            raise ValueError(f"trainer.divergence_factor must be 0 (off) or > 1, got {divergence_factor}")
        if divergence_window < 1:
            raise ValueError(f"trainer.divergence_window must be >= 1, got {divergence_window}")
        self.patience = int(nonfinite_patience)
        self.factor = float(divergence_factor)
        self.history: deque[float] = deque(maxlen=int(divergence_window))
        self.nonfinite_run = 0  # consecutive non-finite grad-norm steps, carried across windows

    def check(self, first_step: int, losses: list[float], grad_norms: list[float],
              weights_finite: bool) -> Verdict:
        """Judge steps ``first_step, first_step + 1, ...``; stops at the first fatal step."""
        verdict = Verdict(first_step, ok=[])
        for i, (loss, norm) in enumerate(zip(losses, grad_norms, strict=True)):
            step = first_step + i
            if not math.isfinite(loss):
                return self._stop(verdict, "nonfinite_loss", step, f"training loss is {loss} at step {step}")
            if not math.isfinite(norm):
                self.nonfinite_run += 1
                verdict.ok.append(False)
                if self.nonfinite_run > self.patience:
                    return self._stop(
                        verdict, "nonfinite_grad_norm", step,
                        f"gradient norm is {norm} at step {step}: {self.nonfinite_run} steps in a row with "
                        f"a NaN/inf gradient norm (trainer.nonfinite_patience={self.patience} are tolerated "
                        f"and skipped; loss {loss:.4g})")
                verdict.skipped.append(step)
                continue
            self.nonfinite_run = 0
            if (self.factor > 0 and len(self.history) == self.history.maxlen
                    and loss > self.factor * statistics.median(self.history)):
                return self._stop(
                    verdict, "diverged", step,
                    f"training loss {loss:.4g} at step {step} is above trainer.divergence_factor="
                    f"{self.factor:g} x the median {statistics.median(self.history):.4g} of the last "
                    f"{len(self.history)} steps")
            self.history.append(loss)
            verdict.ok.append(True)
        if not weights_finite:
            last = first_step + len(losses) - 1
            return self._stop(verdict, "nonfinite_weights", last,
                              f"the weights contain NaN/inf after step {last}")
        return verdict

    @staticmethod
    def _stop(verdict: Verdict, kind: str, step: int, reason: str) -> Verdict:
        verdict.stop_kind, verdict.stop_step, verdict.reason = kind, step, reason
        return verdict
