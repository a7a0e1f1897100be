"""ModelFn: a network plus the process it was trained on, seen as a denoiser.

A network is called ``net(x_t, time_input(t), **cond) -> prediction`` where the prediction is of
one declared type (``eps``, ``x0``, ``v`` or ``flow``, see :mod:`samplers.process`). Solvers never
look at the raw output: they ask a ModelFn for the clean-sample estimate x0 and the noise estimate
eps at (x_t, t), and read ``nfe`` to report their cost.

Guidance (``samplers.guidance``) and DualFast wrap a ModelFn into another ModelFn, so every solver
gets them without knowing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from samplers.process import PREDICTIONS, Denoised, NoiseProcess, as_time


class ModelFn:
    """Wrap ``net(x_t, t, **cond)`` trained for ``prediction`` under ``process``.

    Args:
        net: any callable ``(x_t, t_input, **cond) -> tensor`` with the shape of x_t.
        process: the noise process the network was trained on.
        prediction: what the network predicts: ``eps``, ``x0``, ``v`` or ``flow``.
        time_input: maps continuous t in [0, 1] (a [B] tensor) to what the network expects as its
            time argument, e.g. ``process.timestep`` for a diffusers model trained on integer
            steps 0..999. Default: t itself.

    Attributes:
        nfe: number of network evaluations so far (a batched cond/uncond pass counts once).
    """

    def __init__(self, net: Callable, process: NoiseProcess, prediction: str = "eps",
                 time_input: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.net, self.process, self.prediction = net, process, prediction
        self.time_input = time_input
        self.nfe = 0

    def reset(self) -> ModelFn:
        """Zero the NFE counter (and any state of wrappers, such as guidance momentum)."""
        self.nfe = 0
        return self

    def batch_times(self, x: torch.Tensor, t) -> torch.Tensor:
        """t as a [B] tensor in x's dtype."""
        if isinstance(t, (float, int)):
            # a fill kernel, not a host -> device copy: no sync per step, and a CUDA graph can hold it
            return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        t = as_time(t, x).to(device=x.device, dtype=x.dtype)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def output(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        """One network evaluation, returned raw (type ``self.prediction``) in x's dtype."""
        t = self.batch_times(x, t)
        t_in = t if self.time_input is None else self.time_input(t)
        self.nfe += 1
        out = self.net(x, t_in, **cond)
        if out.shape != x.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} differs from input {tuple(x.shape)}; "
                             "a ModelFn needs a prediction with the shape of x_t")
        return out.to(x.dtype)

    def predict(self, x: torch.Tensor, t, **cond) -> Denoised:
        """(x0, eps) estimates at (x_t, t)."""
        # a Python-number t stays one: the conversion's coefficients are then host scalars
        t_conv = float(t) if isinstance(t, (float, int)) else self.batch_times(x, t)
        return self.process.to_x0_eps(self.output(x, t, **cond), x, t_conv, self.prediction)

    def x0(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        return self.predict(x, t, **cond).x0

    def eps(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        return self.predict(x, t, **cond).eps

    __call__ = predict

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(prediction={self.prediction!r}, process={self.process!r}, nfe={self.nfe})"
