"""Gaussian noise processes  x_t = alpha(t) * x0 + sigma(t) * eps  on continuous t in [0, 1].

One time convention everywhere in samplers and difftools: **t = 0 is data, t = 1 is noise** (SiT's
code has data at t = 1; convert with ``t -> 1 - t`` when porting its models).

This module is the bottom of the stack: it needs only torch, the samplers build on it, and
difftools re-exports it as :mod:`difftools.process` (so ``from difftools.process import VP`` and
the Hydra targets ``difftools.process.VP`` of older configs keep working).

Every process exposes

* ``alpha(t)``, ``sigma(t)`` and their t-derivatives ``d_alpha(t)``, ``d_sigma(t)``;
* ``lambda_(t) = log(alpha / sigma)`` (half the log-SNR) and its exact inverse ``t_of_lambda``;
* conversions between the four prediction types a network may be trained for

  ===========  =====================================================  ==============================
  name         what the network predicts                              used by
  ===========  =====================================================  ==============================
  ``eps``      the noise eps                                          DDPM, ADM, Stable Diffusion 1.x
  ``x0``       the clean sample x0 (a denoiser D(x_t))                EDM (after preconditioning)
  ``v``        v = alpha * eps - sigma * x0  (Salimans & Ho, 2022)    SD 2.x-v, Imagen Video
  ``flow``     the velocity dx_t/dt = alpha' x0 + sigma' eps          SiT, SD3, FLUX (= eps - x0)
  ===========  =====================================================  ==============================

* the regression target of each prediction type for training, and the usual training
  distributions of t (uniform, logit-normal, EDM's log-normal in sigma/alpha).

The solvers in :mod:`samplers` only ever look at alpha, sigma, lambda and t(lambda), so one
solver serves VP, flow and EDM models alike.

All functions take floats or tensors; floats become float64 tensors. Tensors keep their dtype,
so float64 inputs give float64 results (the diffusers cross-checks run in float64).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from typing import Literal, NamedTuple

import torch

__all__ = [
    "EDM",
    "PREDICTIONS",
    "VP",
    "Denoised",
    "DiscreteVP",
    "Flow",
    "NoiseProcess",
    "Prediction",
    "TDistribution",
    "as_time",
    "broadcast_to",
    "make_process",
    "process_from_config",
    "scalar_at",
]

Prediction = Literal["eps", "x0", "v", "flow"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "flow")
TDistribution = Literal["uniform", "logit_normal", "edm_lognormal"]


def as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    """Turn a float / sequence / tensor of times into a floating tensor (float64 for Python floats)."""
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.double()
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype if like.is_floating_point() else torch.float64,
                               device=like.device)
    return torch.as_tensor(t, dtype=torch.float64)


def broadcast_to(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a scalar or per-sample coefficient [B] so that it broadcasts against x [B, ...]."""
    coef = coef.to(device=x.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))


@functools.lru_cache(maxsize=4096)
def scalar_at(fn, t: float) -> float:
    """fn(t) in float64 on the CPU, memoised: a sampler asks for the same grid times every step
    and every call (``fn`` is a bound method: the key includes the process instance)."""
    return float(fn(torch.tensor(t, dtype=torch.float64)))


class Denoised(NamedTuple):
    """A model prediction expressed both ways: the clean-sample estimate and the noise estimate."""

    x0: torch.Tensor
    eps: torch.Tensor


class NoiseProcess(ABC):
    """A Gaussian forward process ``x_t = alpha(t) x0 + sigma(t) eps`` with t in [0, 1]."""

    #: largest time at which sampling may start (1.0 for all built-in processes). For ``Flow`` and
    #: lambda(1) = -inf; the samplers treat that first step in its exact limit.
    t_max: float = 1.0

    # ----------------------------------------------------------------- schedule
    @abstractmethod
    def alpha(self, t) -> torch.Tensor: ...

    @abstractmethod
    def sigma(self, t) -> torch.Tensor: ...

    @abstractmethod
    def d_alpha(self, t) -> torch.Tensor:
        """d alpha / dt."""

    @abstractmethod
    def d_sigma(self, t) -> torch.Tensor:
        """d sigma / dt."""

    def lambda_(self, t) -> torch.Tensor:
        """lambda(t) = log(alpha(t) / sigma(t)), half the log signal-to-noise ratio; decreasing in t."""
        t = as_time(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    @abstractmethod
    def t_of_lambda(self, lambda_) -> torch.Tensor:
        """The exact inverse of :meth:`lambda_`."""

    def snr(self, t) -> torch.Tensor:
        return torch.exp(2.0 * self.lambda_(t))

    def marginal(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Draw from q(x_t | x0): ``x_t = alpha(t) x0 + sigma(t) eps`` (t scalar or one per sample)."""
        t = as_time(t, x0)
        return broadcast_to(self.alpha(t), x0) * x0 + broadcast_to(self.sigma(t), x0) * eps

    # ------------------------------------------------------------ conversions
    @staticmethod
    def _coef(fn, t, x: torch.Tensor):
        """fn(t) ready to multiply x: a Python float when t is one Python number for the whole
        batch (the samplers' case: evaluated in float64 on the CPU, so a solver step launches no
        device kernels for its coefficients), else a tensor broadcast against x."""
        if isinstance(t, (float, int)):
            return scalar_at(fn, float(t))
        return broadcast_to(fn(as_time(t, x)), x)

    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t, prediction: Prediction) -> Denoised:
        """Express a network output of type ``prediction`` as (x0, eps) at (x_t, t).

        * eps:  x0 = (x_t - sigma eps) / alpha
        * x0:   eps = (x_t - alpha x0) / sigma
        * v:    x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2),
                eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
        * flow: solve [alpha sigma; alpha' sigma'] [x0; eps] = [x_t; u]
                (determinant alpha sigma' - sigma alpha')
        """
        a, s = self._coef(self.alpha, t, x_t), self._coef(self.sigma, t, x_t)
        if prediction == "eps":
            return Denoised((x_t - s * pred) / a, pred)
        if prediction == "x0":
            return Denoised(pred, (x_t - a * pred) / s)
        if prediction == "v":
            norm = a * a + s * s
            return Denoised((a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm)
        if prediction == "flow":
            da, ds = self._coef(self.d_alpha, t, x_t), self._coef(self.d_sigma, t, x_t)
            det = a * ds - s * da
            return Denoised((ds * x_t - s * pred) / det, (a * pred - da * x_t) / det)
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t, prediction: Prediction) -> torch.Tensor:
        """The value a network of type ``prediction`` would output for the pair (x0, eps) at t.

        This is also the regression target of that prediction type during training.
        """
        t = as_time(t, x0)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        a, s = broadcast_to(self.alpha(t), x0), broadcast_to(self.sigma(t), x0)
        if prediction == "v":
            return a * eps - s * x0
        if prediction == "flow":
            return broadcast_to(self.d_alpha(t), x0) * x0 + broadcast_to(self.d_sigma(t), x0) * eps
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, source: Prediction,
                target: Prediction) -> torch.Tensor:
        """Convert a prediction of type ``source`` at (x_t, t) into one of type ``target``."""
        if source == target:
            return pred
        x0, eps = self.to_x0_eps(pred, x_t, t, source)
        return self.from_x0_eps(x0, eps, t, target)

    target = from_x0_eps

    def velocity(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """Probability-flow ODE drift dx/dt given a clean-sample estimate x0 at (x_t, t)."""
        t = as_time(t, x_t)
        a, s = broadcast_to(self.alpha(t), x_t), broadcast_to(self.sigma(t), x_t)
        eps = (x_t - a * x0) / s
        return broadcast_to(self.d_alpha(t), x_t) * x0 + broadcast_to(self.d_sigma(t), x_t) * eps

    # ---------------------------------------------------------- training times
    def sample_t(self, n: int, distribution: TDistribution = "uniform", *, generator=None,
                 device=None, t_min: float = 1e-5, t_max: float = 1.0, mean: float | None = None,
                 std: float | None = None) -> torch.Tensor:
        """Draw n training times.

        * ``uniform``: t ~ U[t_min, t_max].
        * ``logit_normal``: t = sigmoid(n), n ~ N(mean=0, std=1) (Esser et al. 2024, SD3).
        * ``edm_lognormal``: ln(sigma/alpha) ~ N(mean=-1.2, std=1.2) (Karras et al. 2022, EDM),
          mapped to t through lambda = -ln(sigma/alpha), so it applies to every process.
        Results are clamped into [t_min, t_max].
        """
        kw = dict(generator=generator, device=device, dtype=torch.float32)
        if distribution == "uniform":
            t = t_min + (t_max - t_min) * torch.rand(n, **kw)
        elif distribution == "logit_normal":
            t = torch.sigmoid((0.0 if mean is None else mean) + (1.0 if std is None else std)
                              * torch.randn(n, **kw))
        elif distribution == "edm_lognormal":
            p_mean, p_std = (-1.2 if mean is None else mean), (1.2 if std is None else std)
            log_sigma = p_mean + p_std * torch.randn(n, **kw)
            t = self.t_of_lambda(-log_sigma.double()).float()
        else:
            raise ValueError(f"unknown t distribution {distribution!r}; expected uniform, logit_normal "
                             "or edm_lognormal")
        return t.clamp(t_min, t_max)

    def config(self) -> dict:
        """Constructor arguments, so that a process round-trips through a checkpoint's config."""
        return {"kind": type(self).__name__}


# --------------------------------------------------------------------------- VP family
def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through (xp, fp), xp increasing, extrapolating the end segments."""
    xp, fp = xp.to(x), fp.to(x)
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x_lo, x_hi, f_lo, f_hi = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f_lo + (f_hi - f_lo) * (x - x_lo) / (x_hi - x_lo)


class VP(NoiseProcess):
    """Variance-preserving process: alpha^2 + sigma^2 = 1 (Ho et al. 2020; Song et al. 2021).

    ``schedule="linear"``: beta(t) = beta_min + t (beta_max - beta_min), so
        log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2.
    ``schedule="cosine"`` (Nichol & Dhariwal 2021, continuous form of DPM-Solver):
        alpha(t) = cos(pi/2 (tau + s) / (1 + s)) / cos(pi/2 s / (1 + s)),  tau = t * tau_max,
    with s = 0.008 and tau_max = 0.9946 so that alpha(1) stays positive (lambda(1) is finite).
    ``VP.from_alphas_cumprod`` builds the discrete schedule a diffusers model was trained with.
    """

    def __init__(self, schedule: Literal["linear", "cosine"] = "linear", beta_min: float = 0.1,
                 beta_max: float = 20.0, cosine_s: float = 0.008, cosine_tau_max: float = 0.9946):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"VP schedule must be 'linear' or 'cosine', got {schedule!r}")
        self.schedule, self.beta_min, self.beta_max = schedule, float(beta_min), float(beta_max)
        self.cosine_s, self.cosine_tau_max = float(cosine_s), float(cosine_tau_max)
        self._cos_scale = math.pi / 2 * self.cosine_tau_max / (1 + self.cosine_s)
        self._cos_shift = math.pi / 2 * self.cosine_s / (1 + self.cosine_s)
        self._cos_log0 = math.log(math.cos(self._cos_shift))

    def log_alpha(self, t) -> torch.Tensor:
        t = as_time(t)
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return torch.log(torch.cos(self._cos_scale * t + self._cos_shift)) - self._cos_log0

    def d_log_alpha(self, t) -> torch.Tensor:
        t = as_time(t)
        if self.schedule == "linear":
            return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min
        return -self._cos_scale * torch.tan(self._cos_scale * t + self._cos_shift)

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def d_alpha(self, t) -> torch.Tensor:
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t) -> torch.Tensor:
        # sigma^2 = 1 - alpha^2  =>  sigma' = -alpha alpha' / sigma
        a = self.alpha(t)
        return -a * a * self.d_log_alpha(t) / self.sigma(t)

    def lambda_(self, t) -> torch.Tensor:
        log_a = self.log_alpha(t)
        return log_a - 0.5 * torch.log(-torch.expm1(2.0 * log_a))

    @staticmethod
    def _log_alpha_of_lambda(lambda_: torch.Tensor) -> torch.Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -1/2 log(1 + exp(-2 lambda))
        return -0.5 * torch.logaddexp(torch.zeros_like(lambda_), -2.0 * lambda_)

    def t_of_lambda(self, lambda_) -> torch.Tensor:
        lambda_ = as_time(lambda_)
        log_a = self._log_alpha_of_lambda(lambda_)
        if self.schedule == "linear":
            # Solve (beta_max - beta_min)/4 t^2 + beta_min/2 t + log_a = 0 for t >= 0, written in
            # the cancellation-free form t = 2c / (b + sqrt(b^2 - 4ac)).
            d = self.beta_max - self.beta_min
            c = -2.0 * log_a
            return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * c))
        return (torch.arccos(torch.exp(log_a + self._cos_log0)) - self._cos_shift) / self._cos_scale

    def config(self) -> dict:
        return {"kind": "VP", "schedule": self.schedule, "beta_min": self.beta_min,
                "beta_max": self.beta_max, "cosine_s": self.cosine_s, "cosine_tau_max": self.cosine_tau_max}

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> DiscreteVP:
        """The discrete N-step schedule of a diffusers-trained model (see :class:`DiscreteVP`)."""
        return DiscreteVP(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas) -> DiscreteVP:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return DiscreteVP(torch.cumprod(1.0 - betas, dim=0))

    def __repr__(self) -> str:
        if self.schedule == "linear":
            return f"VP(linear, beta_min={self.beta_min}, beta_max={self.beta_max})"
        return f"VP(cosine, s={self.cosine_s}, tau_max={self.cosine_tau_max})"


class DiscreteVP(VP):
    """A VP process defined by N discrete cumulative products ``alphas_cumprod[i]``, i = 0..N-1.

    As in DPM-Solver's discrete ``NoiseScheduleVP``: training index i sits at t_i = (i + 1) / N and
    log alpha(t) is piecewise linear in t through the points (t_i, 1/2 log alphas_cumprod[i]). So at
    t = (i + 1) / N the process equals the training schedule exactly, and a network that takes
    integer timesteps is called with ``timestep(t) = N t - 1``. Below t_0 the segment runs to the
    data, (t = 0, log alpha = 0): alpha(0) = 1, sigma(0) = 0, lambda(0) = +inf, which is where
    diffusers' schedulers end a run ("timestep -1", ``alphas_cumprod`` = 1; ``final_sigmas_type="zero"``).
    (DPM-Solver extends the first segment linearly instead; with rising betas that gives alpha > 1
    and an undefined sigma near t = 0.)
    """

    def __init__(self, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must hold at least 2 values, each in (0, 1)")
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac
        self.num_train_timesteps = n = ac.numel()
        # the grid starts at the data, (0, 0), then the N training points
        self._t_grid = torch.arange(0, n + 1, dtype=torch.float64) / n
        self._log_alpha_grid = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(ac)])
        # d log alpha / dt on each segment, used for the derivative (right-continuous).
        self._slopes = torch.diff(self._log_alpha_grid) / torch.diff(self._t_grid)
        self.schedule = "discrete"

    def log_alpha(self, t) -> torch.Tensor:
        t = as_time(t)
        return _interp(t, self._t_grid, self._log_alpha_grid)

    def d_log_alpha(self, t) -> torch.Tensor:
        t = as_time(t)
        idx = (torch.searchsorted(self._t_grid.to(t), t.contiguous(), right=True) - 1)
        return self._slopes.to(t)[idx.clamp(0, self._slopes.numel() - 1)]

    def t_of_lambda(self, lambda_) -> torch.Tensor:
        lambda_ = as_time(lambda_)
        log_a = self._log_alpha_of_lambda(lambda_)
        # log alpha is decreasing in t; interpolate on the flipped (increasing) grid.
        return _interp(log_a, self._log_alpha_grid.flip(0), self._t_grid.flip(0))

    def timestep(self, t) -> torch.Tensor:
        """The (continuous) training-timestep index a discrete-time network expects at t."""
        return as_time(t) * self.num_train_timesteps - 1.0

    def t_of_timestep(self, timestep) -> torch.Tensor:
        return (as_time(timestep) + 1.0) / self.num_train_timesteps

    def config(self) -> dict:
        return {"kind": "DiscreteVP", "alphas_cumprod": self.alphas_cumprod.tolist()}

    def __repr__(self) -> str:
        return f"DiscreteVP(N={self.num_train_timesteps})"


class Flow(NoiseProcess):
    """Rectified flow / linear interpolant: alpha = 1 - t, sigma = t (Liu et al. 2022; Lipman et al.
    2022; SiT). The ``flow`` prediction is the constant velocity eps - x0. lambda(1) = -inf."""

    def alpha(self, t) -> torch.Tensor:
        return 1.0 - as_time(t)

    def sigma(self, t) -> torch.Tensor:
        return as_time(t).clone()

    def d_alpha(self, t) -> torch.Tensor:
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def t_of_lambda(self, lambda_) -> torch.Tensor:
        # (1 - t) / t = e^lambda  =>  t = 1 / (1 + e^lambda) = sigmoid(-lambda)
        return torch.sigmoid(-as_time(lambda_))

    def __repr__(self) -> str:
        return "Flow()"


class EDM(NoiseProcess):
    """Variance-exploding process of EDM (Karras et al. 2022): alpha = 1, sigma = sigma_max * t.

    EDM's own time is sigma itself; here sigma_max maps to t = 1 and data to t = 0, so EDM's
    sampling range [sigma_min, sigma_max] is t in [sigma_min / sigma_max, 1].
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(sigma_data)

    @property
    def t_min(self) -> float:
        return self.sigma_min / self.sigma_max

    def alpha(self, t) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def sigma(self, t) -> torch.Tensor:
        return self.sigma_max * as_time(t)

    def d_alpha(self, t) -> torch.Tensor:
        return torch.zeros_like(as_time(t))

    def d_sigma(self, t) -> torch.Tensor:
        return torch.full_like(as_time(t), self.sigma_max)

    def lambda_(self, t) -> torch.Tensor:
        return -torch.log(self.sigma(t))

    def t_of_lambda(self, lambda_) -> torch.Tensor:
        return torch.exp(-as_time(lambda_)) / self.sigma_max

    def t_of_sigma(self, sigma) -> torch.Tensor:
        return as_time(sigma) / self.sigma_max

    def config(self) -> dict:
        return {"kind": "EDM", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data}

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


_KINDS = {"VP": VP, "DiscreteVP": DiscreteVP, "Flow": Flow, "EDM": EDM}


def process_from_config(config: dict) -> NoiseProcess:
    """Rebuild a process from :meth:`NoiseProcess.config` (used by checkpoints)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown process kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind](**config)


def make_process(name: str, **kwargs) -> NoiseProcess:
    """Build a process by short name: ``vp`` / ``vp_linear``, ``vp_cosine``, ``flow``, ``edm``."""
    name = name.lower()
    if name in ("vp", "vp_linear"):
        return VP("linear", **kwargs)
    if name == "vp_cosine":
        return VP("cosine", **kwargs)
    if name in ("flow", "rectified_flow"):
        return Flow(**kwargs)
    if name in ("edm", "ve"):
        return EDM(**kwargs)
    raise ValueError(f"unknown process {name!r}; expected vp, vp_cosine, flow or edm")
