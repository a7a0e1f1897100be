"""Langevin correctors (samplers.langevin): first-order Langevin, LML as a preconditioned Langevin step
(arXiv 2505.24222) and the official code's zero-NFE increment operator.

The central checks run on the exact Gaussian-mixture denoiser of tests/mixture.py: started from exact
samples of the noisy marginal p_t, a correct Langevin step must keep them distributed as p_t.
``python -m tests.test_langevin`` prints the docs/guidance.md tables.
"""

from __future__ import annotations

import math

import pytest
import torch

from difftools.process import VP, Flow
from samplers import sample
from samplers.langevin import AUTO_RHO, LangevinCorrector, LMIncrement, LMLCorrector, auto_step
from tests.mixture import make_mixture

torch.set_num_threads(1)

STEPS = (0.1, 0.3, 0.5, 1.0)


def sliced_wasserstein(a, b, n_proj=256, seed=3):
    """Sliced 2-Wasserstein distance between two equal-size samples (random unit projections)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(a.shape[1], n_proj, generator=g, dtype=a.dtype)
    proj = proj / proj.norm(dim=0, keepdim=True)
    pa, _ = (a @ proj).sort(0)
    pb, _ = (b @ proj).sort(0)
    return ((pa - pb) ** 2).mean().sqrt().item()


def spread(x):
    """Root mean squared distance to the sample mean."""
    return (x - x.mean(0)).pow(2).sum(1).mean().sqrt().item()


def _mixture(dim):
    return make_mixture(dim=dim, num_components=6, std=0.3, radius=1.5, seed=0)


def _marginal(mix, process, t, n, seed):
    """n exact samples of p_t: alpha_t x0 + sigma_t eps."""
    x0, _ = mix.sample(n, torch.Generator().manual_seed(seed))
    eps = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)
    t = torch.tensor(t, dtype=torch.float64)
    return process.alpha(t) * x0 + process.sigma(t) * eps


def _setup(dim=8, n=10_000):
    mix = _mixture(dim)
    process = VP()
    data, _ = mix.sample(n, torch.Generator().manual_seed(5))
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return mix.model_fn(process), data, noise, process


def _invariance(corrector, process, dim, t, n=4000, iters=30):
    """(spread ratio, sliced W2, floor) after ``iters`` iterations at fixed t from exact p_t samples;
    floor = sliced W2 between two independent exact samples of p_t."""
    mix = _mixture(dim)
    x, ref = _marginal(mix, process, t, n, 1), _marginal(mix, process, t, n, 2)
    corrector.n_steps = iters
    y = corrector.correct(mix.model_fn(process), x, t, {})
    return spread(y) / spread(ref), sliced_wasserstein(y, ref), sliced_wasserstein(x, ref)


# ------------------------------------------------------------------ the preconditioner
def test_preconditioner_is_the_damped_sherman_morrison_inverse():
    """P v and P^{1/2} z against the dense lambda (lambda I + u u^T)^{-1} and its eigen square root."""
    g = torch.Generator().manual_seed(0)
    u, v, z = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    u[2] *= 1e-4  # nearly no curvature: P close to I
    lml = LMLCorrector(lamb=0.7)
    w = lml.factor(u)
    for i in range(3):
        dense = 0.7 * torch.linalg.inv(0.7 * torch.eye(5, dtype=torch.float64) + torch.outer(u[i], u[i]))
        evals, evecs = torch.linalg.eigh(dense)
        half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
        assert (lml.precondition(w, v)[i] - dense @ v[i]).abs().max().item() < 1e-12
        assert (lml.precondition_sqrt(w, z)[i] - half @ z[i]).abs().max().item() < 1e-12


def test_divergence_estimate_is_unbiased_for_div_p():
    """Mean of (D_z P) z over many z = div P, with div P computed independently by autograd on
    P(x) = lambda (lambda I + eps(x) eps(x)^T)^{-1} (dense inverse, 2-D exact mixture)."""
    mix, process, t, lamb = _mixture(2), VP(), 0.5, 0.05
    mf = mix.model_fn(process)
    sigma = process.sigma(torch.tensor(t, dtype=torch.float64))
    points = torch.tensor([[0.3, -0.8], [1.1, 0.4], [-0.5, 0.2]], dtype=torch.float64)

    alpha = process.alpha(torch.tensor(t, dtype=torch.float64))

    def p_matrix(x):
        eps = (x - alpha * mix.posterior_mean(x[None], alpha, sigma)[0]) / sigma
        return lamb * torch.linalg.inv(lamb * torch.eye(2, dtype=torch.float64) + torch.outer(eps, eps))

    lml = LMLCorrector(lamb=lamb, fd=1e-4)
    reps = 200_000
    for p in points:
        jac = torch.autograd.functional.jacobian(p_matrix, p)  # [i, j, k] = d P_ij / d x_k
        exact = torch.einsum("ijj->i", jac)
        x = p.expand(reps, 2).clone()
        eps = mf.predict(x, t).eps
        z = torch.randn(reps, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        est = lml.divergence_estimate(mf, x, torch.tensor(t), sigma, eps, lml.factor(eps), z, {})
        mean, stderr = est.mean(0), est.std(0) / math.sqrt(reps)
        assert exact.abs().max().item() > 0.1  # a real drift, not a vanishing one
        assert ((mean - exact).abs() < 5 * stderr + 2e-3).all(), (mean, exact, stderr)


# ------------------------------------------------------------------ p_t invariance
@pytest.mark.parametrize("dim", (2, 8))
@pytest.mark.parametrize("t", (0.2, 0.8))
@pytest.mark.parametrize("step", (0.01, 0.03))
def test_lml_leaves_p_t_invariant(dim, t, step):
    """30 LML iterations (lamb 1e-3, the paper's range) from exact samples of p_t: spread within 3.5 %
    and sliced W2 within 0.04 of the floor (measured: spread 0.990-1.026, W2 at most floor + 0.036)."""
    ratio, sw, floor = _invariance(LMLCorrector(step=step, lamb=1e-3), VP(), dim, t)
    assert abs(ratio - 1.0) < 0.035, ratio
    assert sw < floor + 0.04, (sw, floor)


def test_lml_flow_process_invariance():
    ratio, sw, floor = _invariance(LMLCorrector(step=0.03), Flow(), 8, 0.5)
    assert abs(ratio - 1.0) < 0.02 and sw < floor + 0.01, (ratio, sw, floor)


@pytest.mark.parametrize("dim,min_ratio", [(2, 1.3), (8, 1.5)])
def test_without_the_divergence_drift_lml_inflates_p_t(dim, min_ratio):
    """The same-P step without div P is not a Langevin step for p_t: 30 iterations at step 0.03,
    t = 0.5, spread 1.35x (2-D) / 1.58x (8-D), while first-order Langevin stays within 1 %."""
    ratio, sw, floor = _invariance(LMLCorrector(step=0.03, divergence=False), VP(), dim, 0.5)
    assert ratio > min_ratio and sw > 5 * floor, (ratio, sw, floor)
    ratio_ula, _, _ = _invariance(LangevinCorrector(step=0.03), VP(), dim, 0.5)
    assert abs(ratio_ula - 1.0) < 0.015


# ------------------------------------------------------------------ degenerate settings, NFE
def test_degenerate_settings_reproduce_the_base_exactly():
    mf, _, noise, _ = _setup(dim=4, n=500)
    base = sample(mf.reset(), noise, "ddim", steps=6)
    assert mf.nfe == 6
    # step = 0: the solver trajectory is untouched; the corrector's NFE (2 per iteration) still count
    zero = sample(mf.reset(), noise, "ddim", steps=6, hooks=[LMLCorrector(n_steps=2, step=0.0)])
    assert torch.equal(zero, base) and mf.nfe == 6 + 2 * 2 * 6
    # n_steps = 0 costs nothing
    assert torch.equal(sample(mf.reset(), noise, "ddim", steps=6, hooks=[LMLCorrector(n_steps=0)]), base)
    assert mf.nfe == 6
    # infinite damping: exactly first-order Langevin (same noise stream), one NFE per iteration
    lml_inf = sample(mf.reset(), noise, "ddim", steps=6,
                     hooks=[LMLCorrector(step=0.3, lamb=math.inf, seed=7)])
    assert mf.nfe == 12
    first = sample(mf.reset(), noise, "ddim", steps=6, hooks=[LangevinCorrector(step=0.3, seed=7)])
    assert torch.equal(lml_inf, first)
    assert (first - base).abs().max().item() > 1e-2  # and the corrector does act
    # large finite damping tends to first-order Langevin (P -> I, div P -> 0)
    lml_big = sample(mf.reset(), noise, "ddim", steps=6, hooks=[LMLCorrector(step=0.3, lamb=1e9, seed=7)])
    assert (lml_big - first).abs().max().item() < 1e-6


def test_sample_options_lml_and_momentum_through_the_solver_library():
    """``sample(..., lml=dict(...), momentum=beta)`` builds our hooks; NFE is reported honestly."""
    mf, _, noise, _ = _setup(dim=4, n=200)
    base = sample(mf.reset(), noise, solver="dpmpp_2m", steps=5)
    assert mf.nfe == 5
    with_lml = sample(mf.reset(), noise, solver="dpmpp_2m", steps=5, lml=dict(step=0.3))
    assert mf.nfe == 5 + 2 * 5 and (with_lml - base).abs().max().item() > 1e-3
    same = sample(mf.reset(), noise, solver="dpmpp_2m", steps=5, lml=dict(step=0.0), momentum=1.0)
    assert torch.equal(same, base)
    hb = sample(mf.reset(), noise, solver="dpmpp_2m", steps=5, momentum=0.8)
    assert mf.nfe == 5 and (hb - base).abs().max().item() > 1e-3


def test_auto_step_rule():
    """delta = min(1, 0.13 h^2) with h the logSNR length of the step; a flow model's first step from
    t = 1 (h infinite) gets the cap; the hook applies the rule per step."""
    process = VP()
    lam = process.lambda_(torch.tensor([0.6, 0.5], dtype=torch.float64))
    h = float(lam[1] - lam[0])
    assert 0 < AUTO_RHO * h * h < 1.0
    assert auto_step(process, 0.6, 0.5) == pytest.approx(AUTO_RHO * h * h, rel=1e-12)
    assert auto_step(process, 1.0, 1e-3) == 1.0
    assert auto_step(Flow(), 1.0, 0.8) == 1.0
    seen = []

    class Recording(LMLCorrector):
        def correct(self, model_fn, x, t, cond, delta=None):
            seen.append(delta)
            return x

    mf, _, noise, _ = _setup(dim=2, n=10)
    times = torch.tensor([1.0, 0.6, 0.3, 0.1], dtype=torch.float64)
    sample(mf, noise, "ddim", times=times, hooks=[Recording()])
    pairs = zip(times[:-1].tolist(), times[1:].tolist(), strict=True)
    assert seen == [auto_step(process, a, b) for a, b in pairs]
    assert len(set(seen)) == 3  # one delta per step
    with pytest.raises(ValueError, match="step must be a non-negative number or 'auto'"):
        LMLCorrector(step="fast")


# ------------------------------------------------------------------ equal NFE on the mixture
def test_equal_nfe_lml_does_not_beat_first_order_langevin():
    """Documented limit (docs/guidance.md): after DDIM with 6 steps (8-D mixture), one LML iteration
    (2 NFE) vs two first-order iterations (2 NFE), each at its best step in STEPS: LML 0.059 vs
    first-order 0.046 sliced W2 (n = 4000). A preconditioner that freezes the score direction cannot
    correct the solver's error along it, which is where a few-step solver errs."""
    mf, data, noise, _ = _setup(n=4000)

    def sw(corrector):
        x = sample(mf.reset(), noise, "ddim", steps=6, hooks=[corrector])
        assert mf.nfe == 18
        return sliced_wasserstein(x, data)

    best_lml = min(sw(LMLCorrector(1, s)) for s in STEPS)
    best_first = min(sw(LangevinCorrector(2, s)) for s in STEPS)
    assert best_lml > 1.1 * best_first, (best_lml, best_first)
    # both correctors do improve on the uncorrected 6-step run (0.159)
    base = sliced_wasserstein(sample(mf.reset(), noise, "ddim", steps=6), data)
    assert best_lml < 0.5 * base


# ------------------------------------------------------------------ the official zero-NFE form
def test_increment_operator_by_hand_and_identity_at_kappa_zero():
    mf, _, noise, process = _setup(dim=3, n=4)
    times = torch.tensor([1.0, 0.6, 0.2], dtype=torch.float64)
    base = sample(mf.reset(), noise, "ddim", times=times)
    assert torch.equal(sample(mf.reset(), noise, "ddim", times=times, hooks=[LMIncrement(kappa=0.0)]), base)
    lamb, kappa = 0.3, 0.5
    out = sample(mf.reset(), noise, "ddim", times=times, hooks=[LMIncrement(lamb, kappa)])
    assert mf.nfe == 2  # no evaluation of its own
    # by hand: step 0 unchanged; step 1: g1 replaced by ||g1|| M g1 / ||M g1||, u = kappa g0 + (1-kappa) g1
    x1 = sample(mf.reset(), noise, "ddim", times=times[:2])
    x2 = sample(mf.reset(), x1, "ddim", times=times[1:])
    s = [float(process.sigma(torch.tensor(v))) for v in times.tolist()]
    g0, g1 = x1 - s[1] / s[0] * noise, x2 - s[2] / s[1] * x1
    u = kappa * g0 + (1 - kappa) * g1
    mg = g1 - u * (u * g1).sum(1, keepdim=True) / (lamb + (u * u).sum(1, keepdim=True))
    expect = s[2] / s[1] * x1 + mg * g1.norm(dim=1, keepdim=True) / mg.norm(dim=1, keepdim=True)
    assert (out - expect).abs().max().item() < 1e-8  # the two-call reference rounds differently


def test_official_operator_in_float32_acts_through_rounding():
    """The documented fact about the official code at kappa = 0: M g = g - g <g, g> / (lambda + ||g||^2)
    is g lambda / (lambda + ||g||^2) in exact arithmetic (the rescaled result is g), but in float32 the
    subtraction leaves rounding of relative size 2^-24 ||g||^2 / lambda. For a CIFAR-size eps
    (||g||^2 ~ 3072): about 0.1 relative deviation at lambda = 1e-3, an unrelated direction at 5e-5."""
    g = torch.randn(16, 3072, generator=torch.Generator().manual_seed(0))

    def official_kappa0(lamb):
        sq = (g * g).sum(1, keepdim=True)
        m = g - g * (g * g).sum(1, keepdim=True) / (lamb + sq)
        return m * (sq.sqrt() / m.norm(dim=1, keepdim=True))

    rel = ((official_kappa0(1e-3) - g).norm(dim=1) / g.norm(dim=1)).median().item()
    assert 0.03 < rel < 0.3, rel
    cos = torch.nn.functional.cosine_similarity(official_kappa0(5e-5), g).abs().max().item()
    assert cos < 0.5, cos
    # the same formula in float64 stays g to 1e-12 (the deviation is rounding, not the operator)
    g64 = g.double()
    sq = (g64 * g64).sum(1, keepdim=True)
    m = g64 * (1e-3 / (1e-3 + sq))
    assert ((m * (sq.sqrt() / m.norm(dim=1, keepdim=True)) - g64).abs().max().item()) < 1e-12


# ------------------------------------------------------------------ docs tables
def _tables():
    """``python -m tests.test_langevin``: the docs/guidance.md tables (about 5 min on one core)."""
    print("p_t invariance: spread ratio / sliced W2 after 30 iterations from exact p_t samples (VP, n 4000)")
    print("| dim | t | floor | step | first-order | LML | LML without div P |")
    print("|---|---|---|---|---|---|---|")
    for dim in (2, 8):
        for t in (0.2, 0.5, 0.8):
            for step in (0.01, 0.03, 0.1):
                cells = []
                for c in (LangevinCorrector(step=step), LMLCorrector(step=step),
                          LMLCorrector(step=step, divergence=False)):
                    ratio, sw, floor = _invariance(c, VP(), dim, t)
                    cells.append(f"{ratio:.3f} / {sw:.3f}")
                print(f"| {dim} | {t} | {floor:.3f} | {step} | " + " | ".join(cells) + " |", flush=True)
    print()
    print("after DDIM (sliced W2 to 4000 data samples; NFE in brackets)")
    print("| dim | steps | DDIM | DDIM 3x steps | first-order, 2 it. 0.1 / 0.3 / 0.5 / 1.0 | "
          "LML, 1 it. 0.1 / 0.3 / 0.5 / 1.0 | LML auto | increment form kappa 0.25 / 0.5 |")
    print("|---|---|---|---|---|---|---|---|")
    for dim in (2, 8):
        mf, data, noise, _ = _setup(dim=dim, n=4000)
        for steps in (4, 6, 10, 20):
            def sw(hooks=(), k=1, steps=steps, mf=mf, noise=noise, data=data):
                x = sample(mf.reset(), noise, "ddim", steps=k * steps, hooks=hooks)
                return sliced_wasserstein(x, data)

            cells = [f"{sw():.3f} [{steps}]", f"{sw(k=3):.3f} [{3 * steps}]",
                     " / ".join(f"{sw([LangevinCorrector(2, s)]):.3f}" for s in STEPS) + f" [{3 * steps}]",
                     " / ".join(f"{sw([LMLCorrector(1, s)]):.3f}" for s in STEPS) + f" [{3 * steps}]",
                     f"{sw([LMLCorrector(1)]):.3f}",
                     " / ".join(f"{sw([LMIncrement(kappa=k)]):.3f}" for k in (0.25, 0.5)) + f" [{steps}]"]
            print(f"| {dim} | {steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    _tables()
