"""Optimizer and learning-rate schedule of the engine (the ``trainer`` options that shape them).

* ``optimizer``: ``adamw`` (decoupled weight decay, Loshchilov & Hutter, arXiv 1711.05101) or
  ``sgd`` (momentum, optionally Nesterov). The fused kernel is used where torch has one for the
  device: only a fused optimizer can skip a step with a NaN/inf gradient on the device
  (``found_inf``) without a host sync.
* ``no_decay_1d``: two parameter groups, weight decay on parameters with >= 2 dimensions only
  (biases, norm scales and other 1-D parameters are not decayed; the usual ResNet/ViT recipe).
* Schedule factor f(k) of step k (lr_k = lr f(k)): linear warmup ``(k + 1) / warmup_steps`` for
  k < warmup_steps, then ``constant`` 1, ``cosine`` from 1 down to ``min_lr_ratio``, or ``linear``
  down to 0 at ``max_steps`` (with the warmup: the one-cycle shape of Smith & Topin,
  arXiv 1708.07120).
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("difftools.train")

OPTIMIZERS = ("adamw", "sgd")
LR_DECAYS = ("constant", "cosine", "linear")


def lr_lambda(cfg):
    """f(k) above, for ``torch.optim.lr_scheduler.LambdaLR``."""
    if cfg.lr_decay not in LR_DECAYS:
        raise ValueError(f"trainer.lr_decay must be one of {LR_DECAYS}, got {cfg.lr_decay!r}")

    def fn(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_decay == "cosine":
            span = max(1, cfg.max_steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_decay == "linear":
            return max(cfg.max_steps - step, 0) / max(cfg.max_steps - cfg.warmup_steps, 1)
        return 1.0

    return fn


def weight_decays(cfg) -> list[float]:
    """Weight decay of each parameter group (see :func:`param_groups`)."""
    return [cfg.weight_decay, 0.0] if cfg.no_decay_1d else [cfg.weight_decay]


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], cfg) -> list[dict]:
    """One group, or with ``no_decay_1d`` the >= 2-D parameters then the others (decay 0)."""
    if not cfg.no_decay_1d:
        groups = [[p for _, p in named_params]]
    else:
        groups = [[p for _, p in named_params if p.ndim > 1], [p for _, p in named_params if p.ndim <= 1]]
    return [{"params": ps, "weight_decay": wd} for ps, wd in zip(groups, weight_decays(cfg), strict=True)]


def hyperparameters(cfg) -> dict:
    """The optimizer's per-group options other than weight decay, from the config."""
    if cfg.optimizer == "adamw":
        return {"lr": cfg.lr, "betas": tuple(cfg.betas)}
    if cfg.optimizer == "sgd":
        return {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": bool(cfg.nesterov)}
    raise ValueError(f"trainer.optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")


def build_optimizer(named_params, cfg, device: torch.device) -> tuple[torch.optim.Optimizer, bool]:
    """(optimizer, whether it can skip a step on the device via ``found_inf``)."""
    named_params = list(named_params)
    if not named_params:
        raise ValueError("the objective has no trainable parameters (every parameter has requires_grad "
                         "off, or all submodules are frozen)")
    groups = param_groups(named_params, cfg)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD
    kw = hyperparameters(cfg)
    if device.type in ("cpu", "cuda") and all(p.is_floating_point() for _, p in named_params):
        try:
            return cls(groups, fused=True, **kw), True
        except (RuntimeError, ValueError) as err:
            log.warning("fused %s unavailable (%s): steps with a NaN/inf gradient norm are applied, not "
                        "skipped", cls.__name__, err)
    return cls(groups, **kw), False


def apply_config(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, cfg) -> tuple | None:
    """Set this run's lr and optimizer options after a resume restored the checkpoint's (e.g. to
    continue a diverged run with a lower ``trainer.lr``). Returns (old, new) when they differed."""
    hyper = hyperparameters(cfg)
    decays = weight_decays(cfg)
    groups = opt.param_groups
    if len(groups) != len(decays):
        raise ValueError(f"the checkpoint's optimizer has {len(groups)} parameter group(s), this run "
                         f"{len(decays)}: trainer.no_decay_1d differs from the checkpoint's run")
    old = {"lr": sched.base_lrs[0], **{k: _plain(groups[0][k]) for k in hyper if k != "lr"},
           "weight_decay": [g["weight_decay"] for g in groups]}
    new = {**{k: _plain(v) for k, v in hyper.items()}, "weight_decay": decays}
    if old == new:
        return None
    sched.base_lrs = [cfg.lr] * len(groups)
    for group, fn, wd in zip(groups, sched.lr_lambdas, decays, strict=True):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * fn(sched.last_epoch)  # as LambdaLR computes it
        group["weight_decay"] = wd
        for k, v in hyper.items():
            if k != "lr":
                group[k] = v
    sched._last_lr = [group["lr"] for group in groups]
    return old, new


def _plain(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
