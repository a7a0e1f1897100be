"""EDM preconditioning as a wrapper: any raw network F becomes a well-scaled denoiser D.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv 2206.00364), Table 1 / Eq. 7, with s the noise level of x / alpha:

    D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s))
    c_in    = 1 / sqrt(s^2 + sigma_data^2)        (the net's input has unit variance at every s)
    c_skip  = sigma_data^2 / (s^2 + sigma_data^2)
    c_out   = s sigma_data / sqrt(s^2 + sigma_data^2)

so that F's regression target (x0 - c_skip x) / c_out has unit variance too. D is an x0
prediction (train with ``loss.prediction=x0``; EDM's weighting (s^2 + sigma_data^2) / (s sigma_data)^2
= 1 / c_out^2 makes the loss exactly E||F - F_target||^2).

For a general process x_t = alpha x0 + sigma eps, s = sigma / alpha and D is applied to x_t / alpha.
The 1 / alpha is folded into the coefficients, which then stay finite at alpha = 0 (flow at t = 1):

    D(x_t) = [sigma_data^2 alpha / q] x_t + [sigma sigma_data / sqrt(q)] F(x_t / sqrt(q), t_in),
    q = sigma^2 + alpha^2 sigma_data^2                    (for EDM, alpha = 1: exactly Table 1)

c_noise: the inner net keeps its contract of a time t_in in [0, 1]. EDM uses c_noise = ln(s) / 4;
we take the same affine function of ln(s), normalised so that [sigma_min, sigma_max] maps onto
[0, 1] and clamped there: t_in = (ln s - ln sigma_min) / (ln sigma_max - ln sigma_min). Why not t
itself: for EDM t = s / 80 is linear in s, so the bulk of EDM's log-normal training noise levels
(s ~ 0.03..3) would be squeezed into t < 0.04; in ln(s) they spread over t_in ~ 0.25..0.7. The
clamp keeps t_in finite at s = 0 and s = inf, where c_out = 0 resp. c_skip = 0 carry the exact s.

Checkpoints: ``config()`` holds the inner net's class and constructor arguments plus the process,
so :func:`difftools.load` rebuilds the wrapper from config.yaml. The wrapper has no parameters of
its own and its ``state_dict`` keys are exactly the inner net's (no ``net.`` prefix), so EMA,
export and plain-DiT tooling see the same weight files as without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from difftools.models.registry import rebuildable_class, rebuildable_name, register_rebuildable
from difftools.process import process_from_config

#: inner-net attributes that the trainer, sample grids, losses and metric scripts read
_PASSTHROUGH = ("input_size", "in_channels", "out_channels", "num_classes", "null_class", "hidden_size",
                "depth", "patch_size", "num_tokens", "grid_size")


def edm_coefficients(alpha: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_in, c_skip, c_out) applied to x_t itself (1/alpha folded in; see the module docstring).

    For alpha = 1 these are Table 1 of arXiv 2206.00364 at s = sigma.
    """
    q = sigma**2 + (alpha * sigma_data) ** 2
    return q.rsqrt(), sigma_data**2 * alpha / q, sigma * sigma_data * q.rsqrt()


@register_rebuildable
class EDMPrecond(nn.Module):
    """``D(x_t, t, *cond) = c_skip x_t + c_out net(c_in x_t, t_in, *cond)``: an x0 prediction.

    Args:
        net: the raw network ``net(x, t_in, *args, **kwargs)`` (e.g. a DiT), or its constructor
            arguments as a mapping (then ``net_class`` names the class; used by checkpoints).
        process: the noise process (alpha, sigma), or its ``config()`` mapping.
        sigma_data: data standard deviation (0.5 in EDM for images in [-1, 1]).
        sigma_min, sigma_max: noise levels mapped to t_in = 0 and 1 (EDM's sampling range).
        net_class: ``"module:Class"`` of ``net`` when ``net`` is a mapping; only classes registered
            with :func:`difftools.models.registry.register_rebuildable` are accepted.

    ``return_hidden`` and any other argument go to the inner net; a ``(pred, hidden)`` result comes
    back as ``(D, hidden)``.
    """

    def __init__(self, net: nn.Module | Mapping, process, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, net_class: str | None = None):
        super().__init__()
        if isinstance(net, Mapping):
            if net_class is None:
                raise ValueError("EDMPrecond(net=<mapping>) needs net_class, e.g. 'difftools.models.dit:DiT'")
            net = rebuildable_class(net_class, key="net_class")(**net)  # registered classes only
        if isinstance(process, Mapping):
            process = process_from_config(process)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.net, self.process = net, process
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        # state_dict keys = the inner net's keys (see the module docstring)
        self.register_state_dict_post_hook(_strip_net_prefix)
        self.register_load_state_dict_pre_hook(_add_net_prefix)

    def __getattr__(self, name: str):
        if name in _PASSTHROUGH:
            return getattr(self._modules["net"], name)
        return super().__getattr__(name)

    def time_input(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """t_in = (ln s - ln sigma_min) / (ln sigma_max - ln sigma_min), clamped to [0, 1]."""
        log_s = torch.log(sigma) - torch.log(alpha)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return ((log_s - lo) / (hi - lo)).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor, t, *args, **kwargs):
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        # coefficients in fp32 even under bf16 autocast (the process works in t's dtype)
        alpha, sigma = self.process.alpha(t).float(), self.process.sigma(t).float()
        c_in, c_skip, c_out = (c.view(-1, *([1] * (x.ndim - 1))) for c in
                               edm_coefficients(alpha, sigma, self.sigma_data))
        out = self.net(c_in * x, self.time_input(alpha, sigma), *args, **kwargs)
        if isinstance(out, tuple):
            return (c_skip * x + c_out * out[0], *out[1:])
        return c_skip * x + c_out * out

    def flops_per_image(self) -> int:
        """The inner net's forward FLOPs (the wrapper adds a few elementwise ops, not counted)."""
        return self.net.flops_per_image()

    def set_attn_backend(self, backend: str) -> None:
        self.net.set_attn_backend(backend)

    def config(self) -> dict:
        """Constructor arguments: ``EDMPrecond(**wrapper.config())`` rebuilds it (inner net included)."""
        return {"net": self.net.config(), "net_class": rebuildable_name(self.net),
                "process": self.process.config(), "sigma_data": self.sigma_data, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max}

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}, t_in=log-sigma over [{self.sigma_min}, {self.sigma_max}]"


def _strip_net_prefix(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: '<prefix>net.<key>' -> '<prefix><key>' (the keys are the inner net's)."""
    inner = prefix + "net."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_net_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs) -> None:
    """load_state_dict pre-hook, the inverse of :func:`_strip_net_prefix`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "net." + key[len(prefix):]] = state_dict.pop(key)


def apply_precond(model: nn.Module, kind: str | None, process, **kwargs) -> nn.Module:
    """``kind``: None / ``"none"`` -> ``model`` unchanged; ``"edm"`` -> :class:`EDMPrecond` with
    sigma_data (and sigma_min / sigma_max) taken from the process when it has them (EDM does)."""
    if kind in (None, "none"):
        return model
    if kind != "edm":
        raise ValueError(f"unknown precond {kind!r}; expected 'none' or 'edm'")
    for name in ("sigma_data", "sigma_min", "sigma_max"):
        if hasattr(process, name):
            kwargs.setdefault(name, getattr(process, name))
    return EDMPrecond(model, process, **kwargs)
