"""Langevin correctors (samplers.langevin): first-order Langevin and LML (arXiv 2505.24222)."""

from __future__ import annotations

import math

import torch

from difftools.process import VP
from samplers.langevin import LangevinCorrector, LMLCorrector
from tests.mixture import make_mixture

torch.set_num_threads(1)


def _logsnr_times(process, steps, t_end=1e-3):
    lam = process.lambda_(torch.tensor([1.0, t_end], dtype=torch.float64))
    return process.t_of_lambda(torch.linspace(float(lam[0]), float(lam[1]), steps + 1, dtype=torch.float64))


def _ddim(mf, x, times, hooks=()):
    proc = mf.process
    mf.reset()
    for h in hooks:
        h.reset()
    for i, (tp, tn) in enumerate(zip(times[:-1], times[1:], strict=True)):
        x0, eps = mf.predict(x, tp)
        x_next = proc.alpha(tn) * x0 + proc.sigma(tn) * eps
        for h in hooks:
            x_next = h(mf, x, x_next, tp, tn, i, {})
        x = x_next
    return x


def sliced_wasserstein(a, b, n_proj=256, seed=3):
    """Sliced 2-Wasserstein distance between two equal-size samples (random unit projections)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(a.shape[1], n_proj, generator=g, dtype=a.dtype)
    proj = proj / proj.norm(dim=0, keepdim=True)
    pa, _ = (a @ proj).sort(0)
    pb, _ = (b @ proj).sort(0)
    return ((pa - pb) ** 2).mean().sqrt().item()


def _setup(dim=8, n=10_000):
    mix = make_mixture(dim=dim, num_components=6, std=0.3, radius=1.5, seed=0)
    process = VP()
    data, _ = mix.sample(n, torch.Generator().manual_seed(5))
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return mix.model_fn(process), data, noise, process


def test_degenerate_settings_reproduce_the_base_exactly():
    mf, _, noise, process = _setup(dim=4, n=500)
    times = _logsnr_times(process, 6)
    base = _ddim(mf, noise, times)
    assert mf.nfe == 6
    # step = 0: the solver trajectory is untouched, and the corrector's NFE are still counted
    zero = _ddim(mf, noise, times, [LMLCorrector(n_steps=2, step=0.0)])
    assert (zero - base).abs().max().item() == 0.0
    assert mf.nfe == 6 + 2 * 6
    # n_steps = 0 costs nothing
    assert (_ddim(mf, noise, times, [LMLCorrector(n_steps=0)]) - base).abs().max().item() == 0.0
    assert mf.nfe == 6
    # infinite damping: LML is exactly first-order Langevin (same noise stream)
    lml_inf = _ddim(mf, noise, times, [LMLCorrector(step=0.3, lamb=math.inf, seed=7)])
    first = _ddim(mf, noise, times, [LangevinCorrector(step=0.3, seed=7)])
    assert (lml_inf - first).abs().max().item() == 0.0
    assert (first - base).abs().max().item() > 1e-2  # and the corrector does act


def test_lml_preconditioner_is_the_sherman_morrison_inverse():
    """drift = ||eps|| M eps / ||M eps|| and noise = M^{1/2} z with M = lambda (lambda I + u u^T)^{-1}."""
    g = torch.Generator().manual_seed(0)
    eps, z, prev = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    lml = LMLCorrector(lamb=0.7, kappa=0.25)
    lml._prev_eps = prev
    drift, noise = lml.direction(eps, z)
    for i in range(3):
        u = 0.25 * prev[i] + 0.75 * eps[i]
        m = 0.7 * torch.linalg.inv(0.7 * torch.eye(5, dtype=torch.float64) + torch.outer(u, u))
        evals, evecs = torch.linalg.eigh(m)
        m_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
        m_eps = m @ eps[i]
        assert (drift[i] - eps[i].norm() * m_eps / m_eps.norm()).abs().max().item() < 1e-12
        assert (noise[i] - m_half @ z[i]).abs().max().item() < 1e-12
    # the first iteration has no history: u = eps, so the renormalised drift is eps itself (as the
    # official lm_correct at its default kappa = 0), while the noise along eps is damped
    fresh = LMLCorrector(lamb=0.7)
    drift0, noise0 = fresh.direction(eps, z)
    assert (drift0 - eps).abs().max().item() < 1e-12
    along = (noise0 * eps).sum(1) / eps.norm(dim=1)
    expect = (z * eps).sum(1) / eps.norm(dim=1) * torch.sqrt(0.7 / (0.7 + (eps * eps).sum(1)))
    assert (along - expect).abs().max().item() < 1e-12


def test_lml_beats_first_order_langevin_at_equal_nfe():
    """Sliced W2 to the true mixture (10k samples, 8-D, 6 components), DDIM 10 steps + 1 corrector
    iteration per step = 20 NFE for both correctors. Measured (docs/guidance.md): LML at step 0.1
    0.028; first-order 0.082 / 0.053 / 0.034 at step 0.1 / 0.3 / 1.0; DDIM with 20 steps 0.052."""
    mf, data, noise, process = _setup()
    times = _logsnr_times(process, 10)
    lml = _ddim(mf, noise, times, [LMLCorrector(n_steps=1, step=0.1)])
    assert mf.nfe == 20
    sw_lml = sliced_wasserstein(lml, data)
    sw_first = {s: sliced_wasserstein(_ddim(mf, noise, times, [LangevinCorrector(n_steps=1, step=s)]), data)
                for s in (0.1, 0.3, 1.0)}
    assert mf.nfe == 20
    sw_ddim_20 = sliced_wasserstein(_ddim(mf, noise, _logsnr_times(process, 20)), data)
    assert sw_lml < 0.5 * sw_first[0.1]  # same step size: LML more than halves the distance
    assert sw_lml < 0.9 * min(sw_first.values())  # and beats every first-order step size tried
    assert sw_lml < 0.7 * sw_ddim_20  # also better than spending the 20 NFE on solver steps


def test_sample_options_lml_and_momentum_through_the_solver_library():
    """``sample(..., lml=dict(...), momentum=beta)`` builds our hooks; NFE is reported honestly."""
    from samplers import sample
    mf, _, noise, _ = _setup(dim=4, n=200)
    base = sample(mf.reset(), noise, solver="dpmpp_2m", steps=5)
    assert mf.nfe == 5
    with_lml = sample(mf.reset(), noise, solver="dpmpp_2m", steps=5, lml=dict(step=0.3))
    assert mf.nfe == 10 and (with_lml - base).abs().max().item() > 1e-3
    same = sample(mf.reset(), noise, solver="dpmpp_2m", steps=5, lml=dict(step=0.0), momentum=1.0)
    assert (same - base).abs().max().item() == 0.0
    hb = sample(mf.reset(), noise, solver="dpmpp_2m", steps=5, momentum=0.8)
    assert mf.nfe == 5 and (hb - base).abs().max().item() > 1e-3


class _IncrementLM:
    """For the docs table only: the official schedulers' zero-NFE form, which applies the LM
    operator to the solver's own increment g = x_next - (sigma_n / sigma_p) x_prev (DPM-Solver++'s
    data term) with u = kappa g_prev + (1 - kappa) g, renormalised to ||g||."""

    def __init__(self, lamb=1e-3, kappa=0.5):
        self.lamb, self.kappa, self.prev = lamb, kappa, None

    def reset(self):
        self.prev = None

    def __call__(self, mf, x_prev, x_next, t_prev, t_next, i, cond):
        ratio = mf.process.sigma(t_next) / mf.process.sigma(t_prev)
        g = x_next - ratio * x_prev
        u = g if self.prev is None else self.kappa * self.prev + (1 - self.kappa) * g
        self.prev = g
        d = g - u * (u * g).sum(1, keepdim=True) / (self.lamb + (u * u).sum(1, keepdim=True))
        return ratio * x_prev + d * (g.norm(dim=1, keepdim=True) / d.norm(dim=1, keepdim=True))


def _table():
    """Print the docs/guidance.md LML table: ``python -m tests.test_langevin`` (about 3 min, 1 core)."""
    print("| dim | steps (NFE) | DDIM | DDIM 2x steps | Langevin 0.1 / 0.3 / 1.0 | LML 0.1 / 0.3 / 1.0 "
          "| LML kappa=0 0.1 / 0.3 / 1.0 | official increment form kappa 0.25 / 0.5 (0 extra NFE) |")
    print("|---|---|---|---|---|---|---|---|")
    for dim in (2, 8):
        mf, data, noise, process = _setup(dim=dim)
        for steps in (5, 10):
            times = _logsnr_times(process, steps)

            def sw(hooks, times=times, mf=mf, noise=noise, data=data):
                return sliced_wasserstein(_ddim(mf, noise, times, hooks), data)

            cells = [f"{sw([]):.3f}",
                     f"{sliced_wasserstein(_ddim(mf, noise, _logsnr_times(process, 2 * steps)), data):.3f}"]
            for make in (lambda s: LangevinCorrector(step=s), lambda s: LMLCorrector(step=s),
                         lambda s: LMLCorrector(step=s, kappa=0.0)):
                cells.append(" / ".join(f"{sw([make(s)]):.3f}" for s in (0.1, 0.3, 1.0)))
            cells.append(" / ".join(f"{sw([_IncrementLM(kappa=k)]):.3f}" for k in (0.25, 0.5)))
            print(f"| {dim} | {steps} ({2 * steps}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    _table()
