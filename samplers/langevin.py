"""Langevin correctors for any solver: first-order Langevin, LML as a preconditioned Langevin step,
and the official LML code's zero-NFE operator on the solver's increment.

All three are solver hooks (contract 6): after a solver step lands on x at time t they change x
before the next step. NFE is counted by ``model_fn.nfe``; nothing is hidden.

Notation: s(x) = grad log p_t(x) = -eps_hat(x, t) / sigma_t (the model's own score), h = delta sigma_t^2
(``delta`` = ``step``: -log p_t has curvature at most 1/sigma_t^2, so delta < 2 is stable). Norms and
inner products are per sample over all non-batch dimensions.

**First-order Langevin** (ULA; the corrector of Song et al. 2021, arXiv 2011.13456, sec. 4.2), one NFE
per iteration::

    x <- x + h s(x) + sqrt(2 h) z,        z ~ N(0, I).

**LML as a Langevin step** (Wang et al. 2025, arXiv 2505.24222, "Levenberg-Marquardt-Langevin", ICCV
2025). The abstract (the only part of the paper readable here) says: Langevin dynamics at each noise
level, preconditioned by a low-rank approximation of the diffusion Hessian built from the model's own
output, stabilised by a Levenberg-Marquardt damping term. The Levenberg-Marquardt (outer-product /
Fisher) approximation of the Hessian of -log p_t in eps units, damped, is

    sigma_t^2 H ~ lambda I + u u^T,      u = eps_hat(x, t),

and the preconditioner normalised to the identity off u is its scaled inverse (Sherman-Morrison, O(dim))

    P = lambda (lambda I + u u^T)^{-1} = I - w w^T,      w = u / sqrt(lambda + ||u||^2),
    P^{1/2} = I - (1 - sqrt(1 - ||w||^2)) w_hat w_hat^T.

A preconditioned Langevin step uses the SAME P for drift and noise. Because P depends on x (through
eps_hat(x)), the Fokker-Planck equation keeps p_t invariant only with the extra drift div P
(Ma, Chen, Fox 2015, arXiv 1506.04696: the "Gamma" term of the complete recipe)::

    x <- x + h P s(x) + h div P(x) + sqrt(2 h) P^{1/2} z.

Without div P the step is not a Langevin step for p_t: with lambda << ||u||^2 (the paper's range) P
is nearly the projector off eps_hat, the noise moves x along the level sets of p_t only, and their
curvature pushes every sample outwards (a Gaussian: ||x||^2 grows by 2 h (dim - 1) per iteration).
Measured on the exact mixture (tests/test_langevin.py, 30 iterations from exact samples of p_t): the
spread grows 4-59 % at delta = 0.01-0.03 and 1.4-2.5x at 0.1. With div P it stays within 2.6 % (and the
sliced W2 at the floor + 0.036) at 0.01-0.03, but drifts 9-22 % at 0.1: P freezes the score direction,
so nothing pulls back the O(h) error of the div P drift (first-order Langevin stays within 3 %).
div P = -(J_w w + w tr J_w) with J_w = (I - w w^T) J_u / sqrt(lambda + ||u||^2) needs the Jacobian of
the model; it is estimated without bias from ONE directional derivative along the iteration's own
noise z (E[(D_z P) z] = div P because E[z z^T] = I), by a finite difference
J_u z ~ (eps_hat(x + a z) - eps_hat(x)) / a, a = ``fd`` sigma_t: one more NFE per iteration, counted.
``divergence=False`` drops it (one NFE per iteration, not p_t-invariant; offered to reproduce the
failure, not for use). lambda = inf is exactly first-order Langevin (no extra evaluation).

**The official code's form** (github zituitui/LML-diffusion-sampler, ``lm_correct`` in
scheduler/*_lm.py; read, not copied): NO Langevin noise and NO extra NFE. The damped operator
M = lambda (lambda I + u u^T)^{-1} is applied to the solver's own explicit term g (DDIM: eps;
DPM-Solver(++): the whole increment x_next - (sigma_t/sigma_s) x_prev in data form; flow Euler: the
velocity), with u = kappa g_prev + (1 - kappa) g (g_prev: the previous step's g), and the result is
rescaled to ||g||. :class:`LMIncrement` implements it on the data-form increment. Facts about it
(tested): at kappa = 0 (the default of the official scheduler and scripts; the README's commands do
not set it) u is parallel to g and the operator is exactly the identity; in float32 it is not, because
M g = g - u <u, g> / (lambda + ||u||^2) cancels to a relative size lambda / ||u||^2 and the rounding of
the subtraction (relative 2^-24 ||u||^2 / lambda) survives the rescaling: for ||u||^2 = 3072 (a
CIFAR-size eps) a 0.1 relative random perturbation at lambda = 1e-3 and a direction unrelated to g
at lambda = 5e-5. So at the official defaults lambda sets the size of a float32 rounding noise.
"""

from __future__ import annotations

import math

import torch

from samplers.process import as_time


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product <a, b>, shaped [B, 1, ..., 1]."""
    return (a * b).flatten(1).sum(1).reshape(a.shape[0], *([1] * (a.ndim - 1)))


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v


#: ``step="auto"``: delta = min(AUTO_CAP, AUTO_RHO h^2) with h the logSNR length of the solver step
AUTO_RHO, AUTO_CAP = 0.13, 1.0


def auto_step(process, t_prev, t_next, rho: float = AUTO_RHO, cap: float = AUTO_CAP) -> float:
    """The default step rule: delta = min(cap, rho h^2), h = lambda(t_next) - lambda(t_prev) the logSNR
    length of the solver step just taken (infinite for a flow model's first step from t = 1: cap).

    Fitted on the exact mixtures (tests/test_langevin.py, docs/guidance.md): the best delta of LML
    after DDIM on a uniform-logSNR grid, 8-D and 2-D, was 0.5-1.0 at 4 steps (h = 2.4), 0.3-0.5 at 6,
    0.1-0.3 at 10 and 0.03 at 20 (h = 0.48); rho h^2 with rho = 0.13 gives 0.75 / 0.33 / 0.12 / 0.03.
    It is a per-step rule, so it also serves non-uniform grids."""
    lam = process.lambda_(torch.tensor([float(t_prev), float(t_next)], dtype=torch.float64))
    h = float(lam[1] - lam[0])
    return cap if not math.isfinite(h) else min(cap, rho * h * h)


class LangevinCorrector:
    """First-order Langevin corrector: ``n_steps`` iterations x <- x + h s + sqrt(2h) z at the
    solver's new time, h = delta * sigma_t^2, one NFE each (arXiv 2011.13456, section 4.2).

    Args:
        n_steps: Langevin iterations after each solver step.
        step: delta in h = delta sigma_t^2, a number or ``"auto"`` (:func:`auto_step`, from the
            logSNR length of the solver step). ``step=0`` leaves the solver's trajectory unchanged
            (the evaluations are still made and counted). Default 0.1 (on the mixtures the best
            first-order delta was 0.5-1.0 at 4-20 solver steps; on the DiT it mattered little at
            12 steps, docs/guidance.md).
        t_range: optional (t_lo, t_hi): correct only when t_lo <= t <= t_hi. A hook cannot know
            which step is the last, so it corrects after every step unless t_range excludes the
            final time (e.g. ``t_range=(2e-3, 1.0)`` with the default t_end = 1e-3 saves the
            corrector's evaluations at the end, where sigma is tiny anyway).
        seed: seed of the corrector's own noise generator; ``reset()`` restarts it, so runs repeat.
        rho: the constant of ``step="auto"``.

    NFE of a run = solver NFE + :attr:`nfe_per_iteration` * n_steps * (number of corrected steps).
    """

    nfe_per_iteration = 1

    def __init__(self, n_steps: int = 1, step: float | str = 0.1,
                 t_range: tuple[float, float] | None = None, seed: int = 0, rho: float = AUTO_RHO):
        if step != "auto" and not (isinstance(step, (int, float)) and step >= 0):
            raise ValueError(f"step must be a non-negative number or 'auto', got {step!r}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be non-negative, got {n_steps}")
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        self.n_steps, self.step = int(n_steps), step if step == "auto" else float(step)
        self.t_range, self.seed, self.rho = t_range, int(seed), float(rho)
        self.reset()

    def reset(self) -> None:
        self._generator: torch.Generator | None = None

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return torch.randn(x.shape, generator=self._generator, device=x.device, dtype=x.dtype)

    def _applies(self, t_next: torch.Tensor) -> bool:
        if self.n_steps == 0:
            return False
        t = float(t_next.max())
        return self.t_range is None or self.t_range[0] <= t <= self.t_range[1]

    def iterate(self, model_fn, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, delta: float,
                cond: dict) -> torch.Tensor:
        """One iteration at time t with h = delta sigma^2 (sigma shaped to broadcast against x)."""
        eps = model_fn.predict(x, t, **cond).eps
        # h s = -h eps / sigma = -delta sigma eps
        return x - delta * sigma * eps + math.sqrt(2.0 * delta) * sigma * self._noise(x)

    def correct(self, model_fn, x: torch.Tensor, t, cond: dict, delta: float | None = None) -> torch.Tensor:
        """Run the n_steps iterations at time t (no end-of-run check) with step ``delta``
        (default: ``step``, which must then be a number)."""
        delta = self.step if delta is None else float(delta)
        if delta == "auto":
            raise ValueError("step='auto' needs the solver step: call the hook, or pass delta=")
        t = as_time(t, x)
        sigma = _per_sample(model_fn.process.sigma(t).to(x), x)
        for _ in range(self.n_steps):
            x = self.iterate(model_fn, x, t, sigma, delta, cond)
        return x

    def __call__(self, model_fn, x_prev: torch.Tensor, x_next: torch.Tensor, t_prev, t_next,
                 step_index: int, cond: dict) -> torch.Tensor:
        t_next = as_time(t_next, x_next)
        if not self._applies(t_next):
            return x_next
        delta = self.step
        if delta == "auto":
            delta = auto_step(model_fn.process, float(as_time(t_prev).max()), float(t_next.max()), self.rho)
        return self.correct(model_fn, x_next, t_next, cond, delta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_steps={self.n_steps}, step={self.step})"


class LMLCorrector(LangevinCorrector):
    """Levenberg-Marquardt-Langevin corrector (arXiv 2505.24222) as a preconditioned Langevin step
    (module docstring): x <- x + h P s + h div P + sqrt(2 h) P^{1/2} z, P = lambda (lambda I + u u^T)^{-1},
    u = eps_hat(x, t), h = delta sigma_t^2.

    Args (besides :class:`LangevinCorrector`'s):
        step: as there; default ``"auto"`` (:func:`auto_step`, fitted for this corrector).
        lamb: Levenberg-Marquardt damping lambda, per sample in eps^2 units (||eps||^2 is about the
            dimension). Default 1e-3 (the official README's value at 5-15 NFE). ``math.inf`` is
            exactly :class:`LangevinCorrector` (same noise stream, no extra evaluation).
        divergence: add the div P drift (default; estimated by one finite-difference directional
            derivative, +1 NFE per iteration). ``False`` is the uncorrected step, which does not
            leave p_t invariant (documented failure; for comparison only).
        fd: finite-difference step of that derivative in units of sigma_t (default 0.02). Model
            outputs should be float32: a bf16 output's rounding is divided by ``fd``.
    """

    def __init__(self, n_steps: int = 1, step: float | str = "auto", lamb: float = 1e-3,
                 divergence: bool = True, fd: float = 0.02, t_range: tuple[float, float] | None = None,
                 seed: int = 0, rho: float = AUTO_RHO):
        super().__init__(n_steps, step, t_range, seed, rho)
        if not lamb > 0:
            raise ValueError(f"LML damping lamb must be > 0, got {lamb}")
        if not fd > 0:
            raise ValueError(f"finite-difference step fd must be > 0, got {fd}")
        self.lamb, self.divergence, self.fd = float(lamb), bool(divergence), float(fd)

    @property
    def nfe_per_iteration(self) -> int:
        return 2 if self.divergence and math.isfinite(self.lamb) else 1

    def factor(self, u: torch.Tensor) -> torch.Tensor:
        """w = u / sqrt(lambda + ||u||^2), so that P = I - w w^T."""
        return u * torch.rsqrt(self.lamb + _dot(u, u))

    @staticmethod
    def precondition(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """P v = v - w <w, v>."""
        return v - w * _dot(w, v)

    @staticmethod
    def precondition_sqrt(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """P^{1/2} z = z - w <w, z> / (1 + sqrt(1 - ||w||^2)).

        P has eigenvalue 1 - c (c = ||w||^2) along w and 1 elsewhere, so P^{1/2} = I - (1 - sqrt(1 - c))
        w w^T / c, and (1 - sqrt(1 - c)) / c = 1 / (1 + sqrt(1 - c)) has no cancellation for small c."""
        return z - w * _dot(w, z) / (1.0 + torch.sqrt((1.0 - _dot(w, w)).clamp_min(0.0)))

    def divergence_estimate(self, model_fn, x, t, sigma, eps, w, z, cond) -> torch.Tensor:
        """(D_z P) z, an unbiased estimate of div P over z ~ N(0, I) (one NFE)."""
        a = self.fd * sigma
        j_u_z = (model_fn.predict(x + a * z, t, **cond).eps - eps) / a
        # J_w z = (I - w w^T) J_u z / sqrt(lambda + ||u||^2)
        j_w_z = self.precondition(w, j_u_z) * torch.rsqrt(self.lamb + _dot(eps, eps))
        # D_z (w w^T) z = (J_w z) <w, z> + w <J_w z, z>,  and P = I - w w^T
        return -(j_w_z * _dot(w, z) + w * _dot(j_w_z, z))

    def iterate(self, model_fn, x, t, sigma, delta, cond):
        if math.isinf(self.lamb):
            return super().iterate(model_fn, x, t, sigma, delta, cond)
        eps = model_fn.predict(x, t, **cond).eps
        z = self._noise(x)
        w = self.factor(eps)
        # h P s = -delta sigma P eps
        out = x - delta * sigma * self.precondition(w, eps)
        out = out + math.sqrt(2.0 * delta) * sigma * self.precondition_sqrt(w, z)
        if self.divergence:  # evaluated also at delta = 0, so that NFE does not depend on delta
            out = out + delta * sigma**2 * self.divergence_estimate(model_fn, x, t, sigma, eps, w, z, cond)
        return out

    def __repr__(self) -> str:
        return (f"LMLCorrector(n_steps={self.n_steps}, step={self.step!r}, lamb={self.lamb}, "
                f"divergence={self.divergence})")


class LMIncrement:
    """The official LML code's zero-NFE operator on the solver's increment (module docstring).

    With the data-form increment g = x_next - (sigma_t / sigma_s) x_prev of a step s -> t and
    u = kappa g_prev + (1 - kappa) g::

        x_next <- (sigma_t / sigma_s) x_prev + ||g|| M g / ||M g||,   M g = g - u <u, g> / (lambda + ||u||^2).

    Deterministic; no network evaluation. ``kappa=0`` (the official default) is exactly the identity
    here (computed in exact arithmetic: u is parallel to g); the official float32 code instead
    returns g plus rounding noise (module docstring). A step from sigma_s = 0 or infinite lambda
    leaves x_next unchanged.

    Args:
        lamb: damping lambda in the increment's squared units (official values 5e-5 to 1e-2).
        kappa: weight of the previous step's increment in u, in [0, 1].
    """

    def __init__(self, lamb: float = 1e-3, kappa: float = 0.5):
        if not lamb > 0:
            raise ValueError(f"lamb must be > 0, got {lamb}")
        if not 0.0 <= kappa <= 1.0:
            raise ValueError(f"kappa must be in [0, 1], got {kappa}")
        self.lamb, self.kappa = float(lamb), float(kappa)
        self.reset()

    def reset(self) -> None:
        self._prev: torch.Tensor | None = None

    def __call__(self, model_fn, x_prev, x_next, t_prev, t_next, step_index: int, cond: dict):
        process = model_fn.process
        s_p = _per_sample(process.sigma(as_time(t_prev, x_next)).to(x_next), x_next)
        s_n = _per_sample(process.sigma(as_time(t_next, x_next)).to(x_next), x_next)
        if step_index == 0:
            self._prev = None
        if not bool((s_p > 0).all()) or math.isinf(self.lamb):
            return x_next
        ratio = s_n / s_p
        g = x_next - ratio * x_prev
        prev, self._prev = self._prev, g
        if prev is None or prev.shape != g.shape or self.kappa == 0.0:
            return x_next  # u parallel to g: M g is g scaled, and the rescaling undoes it
        u = self.kappa * prev + (1.0 - self.kappa) * g
        m_g = g - u * _dot(u, g) / (self.lamb + _dot(u, u))
        tiny = torch.finfo(g.dtype).tiny
        return ratio * x_prev + m_g * torch.sqrt(_dot(g, g) / _dot(m_g, m_g).clamp_min(tiny))

    def __repr__(self) -> str:
        return f"LMIncrement(lamb={self.lamb}, kappa={self.kappa})"
