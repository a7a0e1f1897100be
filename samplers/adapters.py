"""diffusers models as ModelFns: ``from_diffusers(model, scheduler_or_config)``.

Parameterisation conversions (t = 0 data, t = 1 noise everywhere in difftools):

* VP schedulers (DDPM/DDIM/DPM-Solver/UniPC/Euler configs with betas): the process is
  ``VP.from_alphas_cumprod(alphas_cumprod)`` (a :class:`~samplers.process.DiscreteVP`); training
  index k sits at t = (k+1)/N, so the network is called with timestep N t - 1.
* Flow-matching schedulers (``FlowMatchEulerDiscreteScheduler`` configs): x_t = (1 - s) x0 + s eps
  with s = t, i.e. our :class:`~samplers.process.Flow`; the network is called with timestep N t;
  its output is the velocity eps - x0 (prediction ``flow``). A ``shift`` != 1 in the config only
  reshapes diffusers' time grid; pass your own ``times`` to :func:`samplers.sample` to mimic it
  (:func:`samplers.diffusers.diffusers_grid` computes them), or run the pipeline with
  ``samplers.diffusers.USFScheduler(schedule="diffusers")``.
* prediction_type: ``epsilon`` -> ``eps``, ``v_prediction`` -> ``v``, ``sample`` -> ``x0``,
  ``flow_prediction`` -> ``flow``.
* Models that learn the variance (out_channels = 2 C, e.g. DiT) are cut to their first C channels.

diffusers is imported lazily, so :mod:`samplers` stays importable with torch alone.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from samplers.model import ModelFn
from samplers.process import VP, Flow, NoiseProcess

_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def source_class_name(config: dict) -> str | None:
    """The diffusers scheduler class a config belongs to: its ``_class_name``, else the one class whose
    constructor takes exactly the config's keys (the config of a scheduler built in code has no
    ``_class_name``); None when no class or several unrelated ones match."""
    if config.get("_class_name"):
        return str(config["_class_name"])
    import diffusers
    from diffusers.utils import DummyObject

    keys = {k for k in config if not k.startswith("_")}
    matches = []
    for name in dir(diffusers):
        if not name.endswith("Scheduler"):
            continue
        cls = getattr(diffusers, name, None)
        if not isinstance(cls, type) or isinstance(cls, DummyObject):
            continue
        if not issubclass(cls, diffusers.SchedulerMixin):
            continue
        if set(inspect.signature(cls.__init__).parameters) - {"self"} == keys:
            matches.append(name)
    # DDIMParallelScheduler & co. share their base scheduler's constructor (and its time grid)
    plain = [m for m in matches if "Parallel" not in m]
    return plain[0] if len(plain) == 1 else None


def _config(scheduler_or_config) -> dict:
    """The config as a dict, with ``_class_name`` wherever the class can be told."""
    if isinstance(scheduler_or_config, dict):
        cfg = dict(scheduler_or_config)
        name = source_class_name(cfg)
    else:
        cfg = getattr(scheduler_or_config, "config", None)
        if cfg is None:
            raise TypeError("from_diffusers needs a diffusers scheduler or its config dict")
        cfg, name = dict(cfg), type(scheduler_or_config).__name__
    if name is not None:
        cfg["_class_name"] = name
    return cfg


def _is_flow(cfg: dict) -> bool:
    return "FlowMatch" in str(cfg.get("_class_name")) or bool(cfg.get("use_flow_sigmas", False))


def _alphas_cumprod(cfg: dict, scheduler_or_config) -> torch.Tensor:
    ac = getattr(scheduler_or_config, "alphas_cumprod", None)
    if ac is not None:
        return torch.as_tensor(ac, dtype=torch.float64)
    from diffusers import DDPMScheduler  # builds betas exactly as every diffusers VP scheduler does

    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "rescale_betas_zero_snr",
    )
    return DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg}).alphas_cumprod.to(torch.float64)


class SchedulerProcess(NamedTuple):
    """What a diffusers scheduler config says about the network trained with it: the process, the
    prediction type, and the timestep the network is called with at time t,
    ``timestep = timestep_scale * t + timestep_shift``."""

    process: NoiseProcess
    prediction: str
    timestep_scale: float
    timestep_shift: float


def scheduler_process(scheduler_or_config, prediction: str | None = None) -> SchedulerProcess:
    """The process, prediction and timestep convention of a diffusers scheduler (or its config dict);
    ``prediction`` overrides the config's ``prediction_type``. See the module docstring."""
    cfg = _config(scheduler_or_config)
    n_train = int(cfg.get("num_train_timesteps", 1000))
    if _is_flow(cfg):
        # diffusers' flow timesteps are sigma * N, and sigma is our t
        return SchedulerProcess(Flow(), prediction or "flow", float(n_train), 0.0)
    process = VP.from_alphas_cumprod(_alphas_cumprod(cfg, scheduler_or_config))
    pred = prediction or _PREDICTION.get(cfg.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(
            f"unsupported prediction_type {cfg.get('prediction_type')!r}; known: {sorted(_PREDICTION)}"
        )
    # training index k sits at t = (k + 1) / N (DiscreteVP), so timestep = N t - 1
    return SchedulerProcess(process, pred, float(process.num_train_timesteps), -1.0)


def from_diffusers(model, scheduler_or_config, prediction: str | None = None) -> ModelFn:
    """A :class:`ModelFn` for a diffusers ``UNet2DModel``, ``Transformer2DModel`` or
    ``DiTTransformer2DModel``, ``SD3Transformer2DModel`` (any module called ``model(x, timestep=...,
    return_dict=False, **cond)``; the timestep goes by keyword, since transformers with text conditioning
    take ``encoder_hidden_states`` second).

    Args:
        model: the diffusers network.
        scheduler_or_config: the scheduler it was trained with, or its config dict.
        prediction: override the config's ``prediction_type``.
    Class labels are passed as ``y=`` to :func:`samplers.sample` (mapped to ``class_labels``).
    """
    process, pred, scale, shift = scheduler_process(scheduler_or_config, prediction)

    def time_input(t: torch.Tensor) -> torch.Tensor:
        return t * scale + shift

    def net(x: torch.Tensor, timestep: torch.Tensor, y=None, **kwargs) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        if y is not None:
            kwargs["class_labels"] = y
        out = model(x.to(dtype), timestep=timestep.to(dtype), return_dict=False, **kwargs)[0]
        channels = x.shape[1]
        if out.shape[1] == 2 * channels:  # learned variance: keep the mean prediction
            out = out[:, :channels]
        return out

    return ModelFn(net, process, pred, time_input=time_input)
