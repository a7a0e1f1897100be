"""Exponential moving average of model weights (Polyak averaging).

    theta_ema <- d_n theta_ema + (1 - d_n) theta,    d_n = min(decay, (1 + n) / (10 + n)) with warmup

The warmup form (used by TensorFlow's ExponentialMovingAverage with ``num_updates`` and by
DDPM / DiT-style training code) makes early EMA weights follow the fast-changing model instead of
staying near the random initialisation; without warmup d_n = decay from the first update.
Floating-point tensors of ``state_dict()`` (parameters and buffers) are averaged in fp32;
integer buffers are copied.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """EMA of ``model.state_dict()``. ``update(model)`` after each optimizer step.

    Args:
        model: the (unwrapped) model whose weights are averaged.
        decay: the asymptotic decay (0.9999 for long runs; ~0.999 for a few thousand steps).
        warmup: use d_n = min(decay, (1 + n) / (10 + n)).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone())
            for k, v in model.state_dict().items()}

    def decay_at(self, n: int) -> float:
        """d_n for the n-th update (n counted from 0)."""
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    def _pair_floats(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadow, model) float tensor lists in the shadow's order, the model's cast to the shadow's
        dtype; non-float buffers (e.g. counters) are copied over as they are."""
        state = model.state_dict()
        floats_ema, floats_new = [], []
        for k, v in self.shadow.items():
            src = state[k].detach()
            if v.is_floating_point():
                floats_ema.append(v)
                floats_new.append(src.to(v.dtype))
            else:
                v.copy_(src)
        return floats_ema, floats_new

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        d = self.decay_at(self.num_updates)
        floats_ema, floats_new = self._pair_floats(model)
        if floats_ema:
            # ema + (1 - d) (new - ema) == d ema + (1 - d) new, fused over all tensors
            torch._foreach_lerp_(floats_ema, floats_new, 1.0 - d)
        self.num_updates += 1
        return d

    @torch.no_grad()
    def update_with_weight(self, model: nn.Module, weight: torch.Tensor) -> None:
        """The same update with w = 1 - d_n read from a 0-dim device tensor, and ``num_updates`` left
        to the caller: the form a CUDA graph can hold (a Python scalar would be baked into the
        graph). ema + w (new - ema) in three fused passes (``_foreach_sub / mul_ / add_``); it
        matches :meth:`update`'s ``lerp`` to fp32 round-off (lerp may contract to one FMA)."""
        floats_ema, floats_new = self._pair_floats(model)
        if floats_ema:
            diff = torch._foreach_sub(floats_new, floats_ema)
            torch._foreach_mul_(diff, weight)
            torch._foreach_add_(floats_ema, diff)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for k, v in self.shadow.items():
            v.copy_(state[k].to(device=v.device, dtype=v.dtype))
        self.num_updates = int(num_updates)

    def to(self, device) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        model.load_state_dict({k: v for k, v in self.shadow.items()}, strict=True)
        return model
