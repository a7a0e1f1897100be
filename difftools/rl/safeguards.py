"""Safeguards against a DiffusionNFT run drifting away from its base model.

Users of the released code report collapse without the KL term (NVlabs/DiffusionNFT #9) and drift
while the reward keeps rising (#20). Two numbers show it early, and both are logged every
iteration by the recipe:

* ``ref_deviation`` = mean (v_theta - v_ref)^2 over the iteration's training batches: how far the
  policy's velocity has moved from the frozen base (the released code's ``kl_div``);
* ``x0_norm`` = mean x0^2 of the collected samples (the released code logs the same): images that
  get brighter or more saturated raise it.

:class:`RunawayGuard` watches them at the end of each iteration. Past a threshold it either stops
the run (:class:`RunawayError`, naming the value, the threshold and the last checkpoint) or raises
the reference weight (``raise_kl``: w_ref <- min(factor w_ref, max_ref_weight), kept in the
checkpoint so a resumed run continues with it; at the cap the run stops).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIONS = ("stop", "raise_kl")


class RunawayError(RuntimeError):
    """The policy drifted past a configured safeguard threshold; the message names value, threshold,
    iteration and the last checkpoint to go back to."""


@dataclass
class RunawayGuard:
    """Thresholds (None = not watched) and what to do when one is crossed.

    Args:
        max_ref_deviation: largest allowed iteration mean of (v_theta - v_ref)^2.
        max_x0_norm_ratio: largest allowed x0_norm / x0_norm of the first iteration (the base's
            samples), e.g. 1.2 for +20 %.
        action: ``stop`` | ``raise_kl``.
        kl_factor: ``raise_kl`` multiplies the reference weight by it (> 1).
        max_ref_weight: ``raise_kl`` never goes above it; crossing a threshold there stops the run.
    """

    max_ref_deviation: float | None = None
    max_x0_norm_ratio: float | None = None
    action: str = "stop"
    kl_factor: float = 10.0
    max_ref_weight: float = 1.0

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"guard.action must be one of {ACTIONS}, got {self.action!r}")
        for name in ("max_ref_deviation", "max_x0_norm_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"guard.{name} must be > 0 or null (off), got {value}")
        if self.kl_factor <= 1:
            raise ValueError(f"guard.kl_factor must be > 1, got {self.kl_factor}")
        if self.max_ref_weight <= 0:
            raise ValueError(f"guard.max_ref_weight must be > 0, got {self.max_ref_weight}")

    @property
    def active(self) -> bool:
        return self.max_ref_deviation is not None or self.max_x0_norm_ratio is not None

    @property
    def needs_reference(self) -> bool:
        return self.max_ref_deviation is not None

    def crossed(self, ref_deviation: float | None, x0_norm: float, x0_norm_start: float) -> str | None:
        """The first threshold crossed, as a sentence, or None."""
        if (
            self.max_ref_deviation is not None
            and ref_deviation is not None
            and not ref_deviation <= self.max_ref_deviation
        ):  # NaN counts as crossed
            return (
                f"ref_deviation = mean (v_theta - v_ref)^2 = {ref_deviation:.4g} > "
                f"guard.max_ref_deviation = {self.max_ref_deviation:g}"
            )
        if self.max_x0_norm_ratio is not None and x0_norm_start > 0:
            ratio = x0_norm / x0_norm_start
            if not ratio <= self.max_x0_norm_ratio:
                return (
                    f"x0_norm = {x0_norm:.4g} is {ratio:.3f} x the first iteration's {x0_norm_start:.4g} > "
                    f"guard.max_x0_norm_ratio = {self.max_x0_norm_ratio:g}"
                )
        return None

    def check(
        self,
        iteration: int,
        ref_deviation: float | None,
        x0_norm: float,
        x0_norm_start: float,
        ref_weight: float,
        last_checkpoint: str,
    ) -> float:
        """The reference weight for the next iteration; raises :class:`RunawayError` to stop."""
        reason = self.crossed(ref_deviation, x0_norm, x0_norm_start)
        if reason is None:
            return ref_weight
        if self.action == "raise_kl" and ref_weight < self.max_ref_weight:
            return min(max(ref_weight, 1e-8) * self.kl_factor, self.max_ref_weight)
        at_cap = (
            f" with loss.ref_weight already at guard.max_ref_weight = {self.max_ref_weight:g}"
            if self.action == "raise_kl"
            else ""
        )
        raise RunawayError(
            f"iteration {iteration}: {reason}{at_cap}: stopping; nothing after the last checkpoint "
            f"({last_checkpoint}) is kept. Resume from it with a larger loss.ref_weight, "
            "guard.action=raise_kl, a lower optim.lr or the slow old-policy schedule (old.schedule=slow); "
            "raise the threshold if this drift is expected"
        )
