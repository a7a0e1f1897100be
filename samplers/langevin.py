"""Langevin correctors for any solver: first-order Langevin and Levenberg-Marquardt-Langevin (LML).

Both are solver hooks (contract 6): after a solver step lands on x at time t, they run
``n_steps`` Langevin iterations that target the noisy marginal p_t, each costing ONE network
evaluation (counted by ``model_fn.nfe``; nothing is hidden). With the score
s(x) = grad log p_t(x) = -eps_hat(x, t) / sigma_t and a step h = delta * sigma_t^2
(``delta`` = "step"; -log p_t has curvature at most 1/sigma_t^2, so delta < 2 is stable):

* first-order Langevin (ULA; the predictor-corrector samplers of Song et al. 2021, arXiv 2011.13456):

      x <- x + h s + sqrt(2 h) z,                z ~ N(0, I).

* LML (Wang et al. 2025, arXiv 2505.24222, "Levenberg-Marquardt-Langevin", ICCV 2025). What could be
  verified here: the abstract (a Langevin update at each noise level preconditioned by (1) a low-rank
  approximation of the diffusion Hessian built from the model's own output, "leveraging the DMs'
  inherent structure", and (2) a Levenberg-Marquardt damping term that stabilises it; negligible
  overhead) and the official code (github zituitui/LML-diffusion-sampler, ``lm_correct`` in
  scheduler/*_lm.py; read, not copied). The paper's Section 3 (Methodology) itself could NOT be read
  from this environment (the stored pages hold only the abstract and the start of the
  introduction), so the section-level details below are the official code's, not the paper's text.

  Low-rank Hessian (the Levenberg-Marquardt / outer-product approximation, H ~ sum_n g_n g_n^T,
  with the score the DM already outputs, s = -eps_hat / sigma_t) and damping:

      H ~ (lambda I + u u^T) / sigma_t^2,        u = kappa eps_prev + (1 - kappa) eps_hat,

  lambda = "lamb" (per-sample, in eps^2 units, as in the official code: 1e-3 for 5-15 NFE, 5e-5 at
  100 NFE in its README); eps_prev is the corrector's previous model output (official default
  kappa = 0).
  Sherman-Morrison gives the damped inverse in O(dim); with M = lambda (lambda I + u u^T)^{-1},

      M eps   = eps - u <u, eps> / (lambda + ||u||^2),
      M^{1/2} z = z - (1 - sqrt(lambda / (lambda + ||u||^2))) u_hat <u_hat, z>,

  and, as ``lm_correct`` does, the preconditioned direction is rescaled to the length of eps
  (the rank-1 curvature ||u||^2 / lambda is far too stiff to be used as a step length; only its
  direction is used):

      d = ||eps|| M eps / ||M eps||,             x <- x - step sigma_t d + sqrt(2 step) sigma_t M^{1/2} z.

  Consequences (tested): lambda -> inf is exactly first-order Langevin; kappa = 0 gives d = eps
  (u parallel to eps, so the official code's default leaves the drift unchanged; only the noise
  along eps is damped); ``step=0`` or ``n_steps=0`` leaves the solver's trajectory unchanged.

  Where LML plugs in: the official schedulers apply ``lm_correct`` to the solver's own increment
  (DDIM's eps, DPM-Solver++'s data term, flow-Euler's velocity) with NO extra network evaluation.
  That form is the identity at kappa = 0 and, at kappa > 0 on our mixture harness, destroys the
  samples (sliced W2 0.43-1.1 vs 0.10-0.33 for plain DDIM, docs/guidance.md), so we do not offer
  it. Here LML is a Langevin corrector at the solver's new noise level, as the abstract describes
  ("Langevin dynamics at each noise level"), and each iteration costs one NFE, counted.

Norms and inner products are per sample over all non-batch dimensions.
"""

from __future__ import annotations

import torch

from samplers.process import as_time


def _sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product <a, b>, shaped [B, 1, ..., 1]."""
    return (a * b).flatten(1).sum(1).reshape(a.shape[0], *([1] * (a.ndim - 1)))


class LangevinCorrector:
    """First-order Langevin corrector: ``n_steps`` iterations x <- x + h s + sqrt(2h) z at the
    solver's new time, h = step * sigma_t^2, one NFE each (arXiv 2011.13456, section 4.2).

    Args:
        n_steps: Langevin iterations after each solver step (each costs one NFE).
        step: delta in h = delta sigma_t^2.
        t_range: optional (t_lo, t_hi): correct only when t_lo <= t <= t_hi. A hook cannot know
            which step is the last, so it corrects after every step unless t_range excludes the
            final time (e.g. ``t_range=(2e-3, 1.0)`` with the default t_end = 1e-3 saves one
            corrector evaluation per iteration; sigma is tiny there anyway).
            NFE of a run = solver NFE + n_steps * (number of corrected steps).
        seed: seed of the corrector's own noise generator; ``reset()`` restarts it, so runs repeat.
    """

    def __init__(self, n_steps: int = 1, step: float = 0.1,
                 t_range: tuple[float, float] | None = None, seed: int = 0):
        if n_steps < 0 or step < 0:
            raise ValueError("n_steps and step must be non-negative")
        self.n_steps, self.step = int(n_steps), float(step)
        self.t_range, self.seed = t_range, int(seed)
        self.reset()

    def reset(self) -> None:
        self._generator: torch.Generator | None = None
        self._prev_eps: torch.Tensor | None = None
        self._last_t: float | None = None

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return torch.randn(x.shape, generator=self._generator, device=x.device, dtype=x.dtype)

    def _applies(self, t_next: torch.Tensor) -> bool:
        t = float(t_next.max())
        if self.n_steps == 0:
            return False
        return self.t_range is None or self.t_range[0] <= t <= self.t_range[1]

    def direction(self, eps: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(drift direction in eps units, noise) of one iteration; first-order: (eps, z)."""
        return eps, z

    def correct(self, model_fn, x: torch.Tensor, t, cond: dict) -> torch.Tensor:
        """Run the n_steps iterations at time t (no end-of-run check)."""
        t = as_time(t, x)
        sigma = model_fn.process.sigma(t).to(x)
        if sigma.ndim:
            sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        h = self.step * sigma**2
        for _ in range(self.n_steps):
            eps = model_fn.predict(x, t, **cond).eps
            drift, noise = self.direction(eps, self._noise(x))
            # h s = -h eps / sigma = -step * sigma * eps
            x = x - self.step * sigma * drift + torch.sqrt(2.0 * h) * noise
        return x

    def __call__(self, model_fn, x_prev: torch.Tensor, x_next: torch.Tensor, t_prev, t_next,
                 step_index: int, cond: dict) -> torch.Tensor:
        t_next = as_time(t_next, x_next)
        t_now = float(t_next.max())
        if self._last_t is not None and t_now > self._last_t + 1e-12:
            self._prev_eps = None  # a new run started without reset(): drop the old history
        self._last_t = t_now
        if not self._applies(t_next):
            return x_next
        return self.correct(model_fn, x_next, t_next, cond)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_steps={self.n_steps}, step={self.step})"


class LMLCorrector(LangevinCorrector):
    """Levenberg-Marquardt-Langevin corrector (arXiv 2505.24222), see the module docstring:
    d = ||eps|| M eps / ||M eps||, x <- x - step sigma d + sqrt(2 step) sigma M^{1/2} z,
    M = lambda (lambda I + u u^T)^{-1}, u = kappa eps_prev + (1 - kappa) eps. One NFE per iteration.

    Args (besides :class:`LangevinCorrector`'s):
        lamb: Levenberg-Marquardt damping lambda, per sample in eps^2 units (||eps||^2 is about
            the dimension). Default 1e-3 (official README, 5-15 NFE). ``float("inf")`` reproduces
            :class:`LangevinCorrector` exactly.
        kappa: weight of the previous model output in u. Default 0.5: at the official default 0
            the drift is exactly first-order (u parallel to eps) and only the noise is
            preconditioned, which measured worse on our mixtures (docs/guidance.md).
    """

    def __init__(self, n_steps: int = 1, step: float = 0.1, lamb: float = 1e-3, kappa: float = 0.5,
                 t_range: tuple[float, float] | None = None, seed: int = 0):
        super().__init__(n_steps, step, t_range, seed)
        if not lamb > 0:
            raise ValueError(f"LML damping lamb must be > 0, got {lamb}")
        if not 0.0 <= kappa <= 1.0:
            raise ValueError(f"kappa must be in [0, 1], got {kappa}")
        self.lamb, self.kappa = float(lamb), float(kappa)

    def direction(self, eps, z):
        if self._prev_eps is None or self._prev_eps.shape != eps.shape:
            u = eps
        else:
            u = self.kappa * self._prev_eps + (1.0 - self.kappa) * eps
        self._prev_eps = eps
        if self.lamb == float("inf"):
            return eps, z
        tiny = torch.finfo(u.dtype).tiny
        u_sq = _sum(u, u)
        # M eps = eps - u <u, eps> / (lambda + ||u||^2)   (Sherman-Morrison, times lambda)
        m_eps = eps - u * _sum(u, eps) / (self.lamb + u_sq)
        # keep only the direction, at the length of eps (the official lm_correct's renormalisation)
        drift = m_eps * (_sum(eps, eps) / _sum(m_eps, m_eps).clamp_min(tiny)).sqrt()
        # M^{1/2} z = z - (1 - sqrt(lambda / (lambda + ||u||^2))) u_hat <u_hat, z>
        shrink = 1.0 - torch.sqrt(self.lamb / (self.lamb + u_sq))
        noise = z - shrink * u * _sum(u, z) / u_sq.clamp_min(tiny)
        return drift, noise

    def __repr__(self) -> str:
        return f"LMLCorrector(n_steps={self.n_steps}, step={self.step}, lamb={self.lamb}, kappa={self.kappa})"
