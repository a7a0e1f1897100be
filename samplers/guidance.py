"""Guidance as ModelFn wrappers: CFG (with an interval), APG and CFG-Zero*.

Each wrapper is itself a :class:`~samplers.model.ModelFn`, so every solver, schedule and DualFast
sees a guided denoiser without knowing. The conditional and the unconditional pass run as ONE
network call on the concatenated batch ``[x; x]`` (times and every conditioning tensor concatenated
with their unconditional values), so a guided evaluation costs one NFE, as the papers count it.

For a DiT the unconditional values are the null label::

    g = guided(mf, "apg", 4.0, uncond={"y": torch.full_like(y, model.null_class)})
    x0 = sample(g, noise, steps=10, y=y)

Conventions, with P the prediction being guided and Delta = P_cond - P_uncond:

* ``CFG`` (Ho & Salimans 2022, arXiv 2207.12598): P = P_uncond + w Delta on the raw output. CFG is
  affine in the output, so it is the same on eps, x0, v or velocity. ``interval=(t_lo, t_hi)``
  guides only for t_lo <= t <= t_hi and evaluates the conditional model alone elsewhere
  (Kynkaanniemi et al. 2024, arXiv 2404.07724).
* ``APG`` (Sadat et al. 2024, arXiv 2410.02416): reverse momentum M = Delta + beta M_prev, norm cap
  Delta <- M min(1, r / ||M||), split against P_cond into parallel and orthogonal parts (float64).
  ``space="x0"`` (default, the paper): P = P_cond + (w - 1)(Delta_orth + eta Delta_par) on the
  denoised prediction. ``space="model_output"``: diffusers' ``normalized_guidance`` convention,
  P = P_uncond + w (Delta_orth + eta Delta_par) on the raw network output. The two forms agree (and
  equal CFG) only when the update Delta_orth + eta Delta_par is Delta itself: eta = 1, no momentum
  (beta = 0) and the norm cap inactive (r = None or ||Delta|| <= r). With momentum or an active cap the
  update U differs from Delta and the forms differ by Delta - U (paper: P_cond + (w - 1) U =
  P_uncond + Delta + (w - 1) U; diffusers: P_uncond + w U), at any eta. The cap r has the units of the
  guided quantity, so its default is given per space (``APG_DEFAULT_R``).
* ``CFGZeroStar`` (Fan et al. 2025, arXiv 2503.18886): s* = <P_c, P_u> / (||P_u||^2 + 1e-8) per
  sample, P = s* P_u + w (P_c - s* P_u) on the raw output (the velocity of a flow model), and zero
  velocity for the first steps (the zero output of a flow model; the equivalent standing-still
  prediction for eps / x0 / v models).

Norms and inner products are per sample over all non-batch dimensions.
"""

from __future__ import annotations

import math

import torch

from samplers.model import ModelFn
from samplers.process import broadcast_to

_DIMS_ERR = "guidance needs batched inputs x of shape [B, ...]"


def _flat_dims(x: torch.Tensor) -> list[int]:
    if x.ndim < 2:
        raise ValueError(_DIMS_ERR)
    return list(range(1, x.ndim))


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to broadcast against x [B, ...]."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


class Guided(ModelFn):
    """Base class: a ModelFn that evaluates ``inner`` on [cond; uncond] in one call and combines.

    Args:
        model_fn: the ModelFn (or another wrapper) to guide.
        scale: guidance scale w (w = 1 reproduces the conditional model for CFG).
        uncond: the unconditional values of the conditioning keyword arguments, e.g.
            ``{"y": full_like(y, null_class)}``. Keys of ``cond`` missing here are shared by both
            halves (duplicated); non-tensor values must be equal in both.
        interval: optional (t_lo, t_hi); outside it the conditional model alone is evaluated.
    """

    def __init__(self, model_fn: ModelFn, scale: float, uncond: dict | None = None,
                 interval: tuple[float, float] | None = None):
        # Not calling ModelFn.__init__: net/process/prediction are the inner ModelFn's, and nfe is
        # delegated so that a batched cond/uncond pass counts exactly once.
        self.inner = model_fn
        self.net, self.process, self.prediction = model_fn.net, model_fn.process, model_fn.prediction
        self.time_input = model_fn.time_input
        self.scale = float(scale)
        self.uncond = dict(uncond or {})
        if interval is not None:
            t_lo, t_hi = float(interval[0]), float(interval[1])
            if not t_lo <= t_hi:
                raise ValueError(f"interval must satisfy t_lo <= t_hi, got {interval}")
            interval = (t_lo, t_hi)
        self.interval = interval

    # ------------------------------------------------------------------ plumbing
    @property
    def nfe(self) -> int:
        return self.inner.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.inner.nfe = value

    def reset(self) -> Guided:
        """Zero the NFE counter and clear per-run state (momentum, step counters)."""
        self.inner.reset()
        self._reset_state()
        return self

    def _reset_state(self) -> None:
        """Per-run state of a subclass; nothing for plain CFG."""

    def _batched_cond(self, cond: dict, batch: int) -> dict:
        """Concatenate every conditioning tensor with its unconditional value along the batch."""
        merged = {}
        for key in set(cond) | set(self.uncond):
            if key not in cond:
                raise ValueError(f"uncond has key {key!r} that the conditional call lacks; pass {key}=... to "
                                 "the sampler as well")
            c = cond[key]
            u = self.uncond.get(key, c)
            if isinstance(c, torch.Tensor):
                u = torch.as_tensor(u, dtype=c.dtype, device=c.device)
                if u.shape != c.shape:
                    u = u.expand_as(c)
                merged[key] = torch.cat([c, u], dim=0)
            else:
                if isinstance(u, torch.Tensor) or u != c:
                    raise ValueError(f"non-tensor conditioning {key!r} must be the same for cond and uncond")
                merged[key] = c
        return merged

    def cond_uncond(self, x: torch.Tensor, t, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs (P_cond, P_uncond) from ONE network call on the doubled batch."""
        t_b = self.batch_times(x, t)
        out = self.inner.output(torch.cat([x, x], dim=0), torch.cat([t_b, t_b], dim=0),
                                **self._batched_cond(cond, x.shape[0]))
        return out.chunk(2, dim=0)

    def _active(self, x: torch.Tensor, t) -> torch.Tensor | None:
        """[B] bool mask of samples inside the guidance interval, or None when all are."""
        if self.interval is None:
            return None
        t_b = self.batch_times(x, t)
        return (t_b >= self.interval[0]) & (t_b <= self.interval[1])

    def _combine(self, p_cond: torch.Tensor, p_uncond: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """The guided raw output; subclasses override (plain CFG here)."""
        return p_uncond + self.scale * (p_cond - p_uncond)

    # ------------------------------------------------------------------ ModelFn API
    def output(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        active = self._active(x, t)
        if active is not None and not bool(active.any()):
            return self.inner.output(x, t, **cond)
        p_cond, p_uncond = self.cond_uncond(x, t, **cond)
        guided = self._combine(p_cond, p_uncond, x, t)
        if active is not None and not bool(active.all()):
            guided = torch.where(_per_sample(active, x), guided, p_cond)
        return guided

    __call__ = ModelFn.predict  # predict() itself is inherited: it calls this class's output()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, interval={self.interval}, inner={self.inner!r})"


class CFG(Guided):
    """Classifier-free guidance P = P_uncond + w (P_cond - P_uncond) (Ho & Salimans 2022,
    arXiv 2207.12598), optionally only inside a time interval [t_lo, t_hi] (arXiv 2404.07724)."""


#: APG's default norm cap r per guided space (the cap has the units of that space). model_output: 15,
#: diffusers' default for eps / velocity output. x0: 15 kept provisionally, not measured for x0 yet.
APG_DEFAULT_R: dict[str, float] = {"model_output": 15.0, "x0": 15.0}


class APG(Guided):
    """Adaptive projected guidance (Sadat, Hilliges, Weber 2024, arXiv 2410.02416).

    With Delta = P_cond - P_uncond (per call):

    1. reverse momentum  M = Delta + beta M_prev  (beta < 0; beta = 0 switches it off),
    2. norm cap          Delta = M min(1, r / ||M||)  (r = inf or None switches it off),
    3. projection in float64 onto u = P_cond / ||P_cond||:
       Delta_par = <Delta, u> u,  Delta_orth = Delta - Delta_par,
    4. ``space="x0"``: P = P_cond + (w - 1)(Delta_orth + eta Delta_par) on the denoised x0
       (the paper's Algorithm); ``space="model_output"``: P = P_uncond + w (Delta_orth + eta Delta_par)
       on the raw output (diffusers' ``normalized_guidance``). ``form`` overrides the combination
       ("paper" | "diffusers") independently of the space.

    Defaults eta = 0, beta = -0.5 (the paper's Algorithm 1 and its released usage) and r per space
    from :data:`APG_DEFAULT_R`: 15 for ``model_output`` is diffusers' default, set for the eps /
    velocity output of SD-size latent models. For ``x0`` (data units) no value has been measured yet;
    15 is kept there provisionally (on CIFAR-10 pixels in [-1, 1], ||x0|| is about 28, so r = 15 caps
    only large updates) until the GPU sweep on the trained DiT chooses one (docs/guidance.md). The
    paper tunes r per model and space; pass ``r=`` to override, ``r=None`` (or inf) disables the cap.

    The momentum buffer lives for one sampling run: ``reset()`` clears it, and so does a call at a
    larger t than the previous call (a new run starts at high noise) unless
    ``reset_on_t_increase=False``. A batch of a different shape also starts a new buffer.
    """

    def __init__(self, model_fn: ModelFn, scale: float, uncond: dict | None = None,
                 interval: tuple[float, float] | None = None, eta: float = 0.0,
                 r: float | None | str = "default", beta: float = -0.5, space: str = "x0",
                 form: str | None = None, reset_on_t_increase: bool = True):
        super().__init__(model_fn, scale, uncond, interval)
        if space not in APG_DEFAULT_R:
            raise ValueError(f"APG space must be one of {tuple(APG_DEFAULT_R)}, got {space!r}")
        if r == "default":
            r = APG_DEFAULT_R[space]
        elif isinstance(r, str):
            raise ValueError(f"APG r must be a number, None or 'default', got {r!r}")
        form = form or ("paper" if space == "x0" else "diffusers")
        if form not in ("paper", "diffusers"):
            raise ValueError(f"APG form must be 'paper' or 'diffusers', got {form!r}")
        self.eta, self.beta, self.space, self.form = float(eta), float(beta), space, form
        self.r = None if r is None or math.isinf(r) or r <= 0 else float(r)
        self.reset_on_t_increase = reset_on_t_increase
        self._reset_state()

    def _reset_state(self) -> None:
        self._momentum: torch.Tensor | None = None
        self._last_t: float | None = None

    def _update(self, p_cond: torch.Tensor, p_uncond: torch.Tensor, t) -> torch.Tensor:
        """Steps 1-3: the normalized update Delta_orth + eta Delta_par."""
        t_max = float(torch.as_tensor(t).max())
        if self.reset_on_t_increase and self._last_t is not None and t_max > self._last_t + 1e-12:
            self._momentum = None
        self._last_t = t_max
        diff = p_cond - p_uncond
        if self.beta != 0.0:
            if self._momentum is not None and self._momentum.shape == diff.shape:
                diff = diff + self.beta * self._momentum
            self._momentum = diff
        dims = _flat_dims(diff)
        if self.r is not None:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.clamp(self.r / norm, max=1.0)
        # The projection cancels two nearly equal terms; float64 keeps it exact enough (paper, diffusers).
        d64, c64 = diff.double(), p_cond.double()
        unit = torch.nn.functional.normalize(c64, dim=dims)
        par = (d64 * unit).sum(dim=dims, keepdim=True) * unit
        orth = d64 - par
        return (orth + self.eta * par).to(diff.dtype)

    def _guide(self, p_cond: torch.Tensor, p_uncond: torch.Tensor, t) -> torch.Tensor:
        update = self._update(p_cond, p_uncond, t)
        if self.form == "paper":
            return p_cond + (self.scale - 1.0) * update
        return p_uncond + self.scale * update

    def _combine(self, p_cond, p_uncond, x, t):
        if self.space == "model_output":
            return self._guide(p_cond, p_uncond, t)
        t_b = self.batch_times(x, t)
        x0_c = self.process.to_x0_eps(p_cond, x, t_b, self.prediction).x0
        x0_u = self.process.to_x0_eps(p_uncond, x, t_b, self.prediction).x0
        x0 = self._guide(x0_c, x0_u, t)
        # Back to the raw output type at (x, t), so output() and predict() stay consistent.
        a, s = broadcast_to(self.process.alpha(t_b), x), broadcast_to(self.process.sigma(t_b), x)
        return self.process.from_x0_eps(x0, (x - a * x0) / s, t_b, self.prediction)


class CFGZeroStar(Guided):
    """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886) on the raw output (velocity for flow models).

    s* = <P_c, P_u> / (||P_u||^2 + 1e-8) per sample (computed in at least float32, as diffusers),
    P = s* P_u + w (P_c - s* P_u), and P = 0 for the first sampling steps ("zero-init").

    Step counting: a step is a new, smaller evaluation time; a call at a larger time than the last
    one starts a new run (step 0). For multistep solvers (DDIM, DPM-Solver++ 2M/3M, UniPC) this is
    the solver's step index; for single-step multi-stage solvers every stage time counts, and a
    corrector evaluating at the next step's time shares that step.

    Which steps are zeroed (``zero_convention``):

    * ``"diffusers"`` (default): steps with index < ``zero_steps`` (diffusers'
      ``ClassifierFreeZeroStarGuidance(zero_init_steps=K)``; K = 1 zeroes the first step).
    * ``"official"``: steps 0..``zero_steps`` inclusive (the official code's ``i <= zero_steps``;
      its default 0 zeroes the first step) — one more step than diffusers for the same number.
    * ``zero_fraction`` with ``num_steps``: zero the first ceil(fraction * num_steps) steps (the paper
      suggests about the first 4 % of steps); overrides ``zero_steps``.

    ``zero_steps=0`` with the diffusers convention disables zero-init.
    """

    def __init__(self, model_fn: ModelFn, scale: float, uncond: dict | None = None,
                 interval: tuple[float, float] | None = None, zero_steps: int = 1,
                 zero_convention: str = "diffusers", zero_fraction: float | None = None,
                 num_steps: int | None = None):
        super().__init__(model_fn, scale, uncond, interval)
        if zero_convention not in ("diffusers", "official"):
            raise ValueError(f"zero_convention must be 'diffusers' or 'official', got {zero_convention!r}")
        if zero_fraction is not None:
            if num_steps is None:
                raise ValueError("zero_fraction needs num_steps (the number of sampling steps)")
            self.num_zero = math.ceil(float(zero_fraction) * int(num_steps) - 1e-9)
        elif zero_convention == "official":
            self.num_zero = int(zero_steps) + 1
        else:
            self.num_zero = int(zero_steps)
        self._reset_state()

    def _reset_state(self) -> None:
        self.step = -1
        self._last_t: float | None = None

    def _advance(self, t) -> int:
        t_max = float(torch.as_tensor(t).max())
        if self._last_t is None or t_max > self._last_t + 1e-12:
            self.step = 0
        elif t_max < self._last_t - 1e-12:
            self.step += 1
        self._last_t = t_max
        return self.step

    def zero_velocity_output(self, x: torch.Tensor, t) -> torch.Tensor:
        """The raw output whose probability-flow velocity dx/dt is zero: 0 for a flow model (the
        paper's zero-init); for eps / x0 / v models the same "x stands still" prediction, so that
        zero-init means the same thing under every parameterisation."""
        if self.prediction == "flow":
            return torch.zeros_like(x)
        t_b = self.batch_times(x, t)
        x0, eps = self.process.to_x0_eps(torch.zeros_like(x), x, t_b, "flow")
        return self.process.from_x0_eps(x0, eps, t_b, self.prediction)

    @staticmethod
    def optimal_scale(p_cond: torch.Tensor, p_uncond: torch.Tensor) -> torch.Tensor:
        """s* = <P_c, P_u> / (||P_u||^2 + 1e-8), one per sample, shaped to broadcast."""
        dtype = torch.promote_types(p_cond.dtype, torch.float32)
        c, u = p_cond.flatten(1).to(dtype), p_uncond.flatten(1).to(dtype)
        s = (c * u).sum(1) / ((u * u).sum(1) + 1e-8)
        return _per_sample(s, p_cond).to(p_cond.dtype)

    def output(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        if self._advance(t) < self.num_zero:
            # A zeroed step needs no network evaluation, so it adds no NFE (the official code and
            # diffusers still run the model there and throw the result away).
            return self.zero_velocity_output(x, t)
        return super().output(x, t, **cond)

    def _combine(self, p_cond, p_uncond, x, t):
        s = self.optimal_scale(p_cond, p_uncond)
        return s * p_uncond + self.scale * (p_cond - s * p_uncond)


_KINDS = {"cfg": CFG, "apg": APG, "cfg_zero_star": CFGZeroStar, "cfgzerostar": CFGZeroStar,
          "cfg-zero*": CFGZeroStar, "cfg_zero*": CFGZeroStar}


def guided(model_fn: ModelFn, kind: str = "cfg", scale: float = 1.0, uncond: dict | None = None,
           **opts) -> ModelFn:
    """Wrap ``model_fn`` with guidance ``kind`` in {"cfg", "apg", "cfg_zero_star"} (or "none").

    ``opts`` go to the wrapper (``interval``, APG's ``eta``/``r``/``beta``/``space``, CFG-Zero*'s
    ``zero_steps``/``zero_convention``/``zero_fraction``/``num_steps``). ``kind="none"`` returns
    ``model_fn`` unchanged.
    """
    key = kind.lower()
    if key in ("none", "off"):
        return model_fn
    if key not in _KINDS:
        raise ValueError(f"unknown guidance {kind!r}; expected none, cfg, apg or cfg_zero_star")
    return _KINDS[key](model_fn, scale, uncond, **opts)
