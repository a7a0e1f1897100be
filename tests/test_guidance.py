"""Guidance wrappers (samplers.guidance) and heavy-ball momentum (samplers.momentum).

Cross-checks against diffusers' guiders, exact identities (CFG w=1, APG -> CFG), and the
class-conditional Gaussian mixture of tests/mixture.py (one component per class)."""

from __future__ import annotations

import math

import pytest
import torch

from difftools.process import VP, Flow
from samplers.guidance import APG, APG_DEFAULT_R, CFG, CFGZeroStar, guided
from samplers.model import ModelFn
from samplers.momentum import HeavyBall
from tests.mixture import make_class_mixture

torch.set_num_threads(1)


def _toy_net(dim: int = 6, classes: int = 3, seed: int = 0):
    """A smooth nonlinear conditional network on [B, 2, dim/2] inputs; label == classes is null."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    emb = torch.randn(classes + 1, dim, generator=g, dtype=torch.float64)

    def net(x, t, y=None):
        flat = x.reshape(x.shape[0], -1)
        yy = torch.full((x.shape[0],), classes) if y is None else y
        out = torch.tanh(flat @ w.T.to(flat) + emb[yy].to(flat) * (1.0 + t[:, None])) + 0.3 * flat
        return out.reshape(x.shape)

    return net


def _ddim(mf, x, times, hooks=(), **cond):
    """Plain DDIM x_t = alpha_t x0 + sigma_t eps calling hooks with the contract-6 signature."""
    proc = mf.process
    for h in hooks:
        h.reset()
    for i, (tp, tn) in enumerate(zip(times[:-1], times[1:], strict=True)):
        x0, eps = mf.predict(x, tp, **cond)
        x_next = proc.alpha(tn) * x0 + proc.sigma(tn) * eps
        for h in hooks:
            x_next = h(mf, x, x_next, tp, tn, i, cond)
        x = x_next
    return x


def _times(n):
    return torch.linspace(1.0, 1e-3, n + 1, dtype=torch.float64)


def _diffusers_guiders():
    pytest.importorskip("diffusers")
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
    return AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance, MomentumBuffer


def _recorded(prediction="flow", process=None):
    """A ModelFn whose network records every raw (doubled-batch) output it returns."""
    net, log = _toy_net(), []

    def rec(x, t, y=None):
        out = net(x, t, y)
        log.append(out.clone())
        return out

    return ModelFn(rec, process or Flow(), prediction), log


def test_apg_model_output_matches_diffusers_over_a_run():
    AdaptiveProjectedGuidance, _, MomentumBuffer = _diffusers_guiders()
    mf, log = _recorded("flow")
    y = torch.tensor([0, 1, 2, 1])
    w, beta, r, eta, steps = 4.0, -0.5, 1.5, 0.3, 6
    g = APG(mf, w, uncond={"y": torch.full_like(y, 3)}, eta=eta, r=r, beta=beta, space="model_output")
    ref = AdaptiveProjectedGuidance(guidance_scale=w, adaptive_projected_guidance_momentum=beta,
                                    adaptive_projected_guidance_rescale=r, eta=eta)
    ref.momentum_buffer = MomentumBuffer(beta)
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times, worst, clipped = _times(steps), 0.0, 0
    for i, (tp, tn) in enumerate(zip(times[:-1], times[1:], strict=True)):
        out = g.output(x, tp, y=y)
        p_cond, p_uncond = log[-1].chunk(2)
        ref.set_state(step=i, num_inference_steps=steps, timestep=tp)
        expect = ref.forward(p_cond, p_uncond).pred
        worst = max(worst, (out - expect).abs().max().item())
        clipped += int(((p_cond - p_uncond).flatten(1).norm(dim=1) > r).any())
        x0, eps = mf.process.to_x0_eps(out, x, tp, "flow")
        x = mf.process.alpha(tn) * x0 + mf.process.sigma(tn) * eps
    assert worst < 1e-6
    assert clipped > 0  # the norm cap was active in the run, so it is part of what matched
    assert mf.nfe == steps  # one batched call per step


def test_cfg_zero_star_matches_diffusers_over_a_run():
    _, ClassifierFreeZeroStarGuidance, _ = _diffusers_guiders()
    mf, log = _recorded("flow")
    y = torch.tensor([2, 0, 1])
    w, steps = 5.0, 7
    g = CFGZeroStar(mf, w, uncond={"y": torch.full_like(y, 3)}, zero_steps=2)
    ref = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=2)
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    times, worst, zeroed = _times(steps), 0.0, 0
    for i, (tp, tn) in enumerate(zip(times[:-1], times[1:], strict=True)):
        n_before = len(log)
        out = g.output(x, tp, y=y)
        if len(log) > n_before:
            p_cond, p_uncond = log[-1].chunk(2)
        else:  # zero-init step: no network call; diffusers ignores its inputs there
            p_cond = p_uncond = torch.ones_like(x)
            zeroed += 1
        ref.set_state(step=i, num_inference_steps=steps, timestep=tp)
        expect = ref.forward(p_cond, p_uncond).pred
        worst = max(worst, (out - expect).abs().max().item())
        x0, eps = mf.process.to_x0_eps(out, x, tp, "flow")
        x = mf.process.alpha(tn).float() * x0 + mf.process.sigma(tn).float() * eps
    assert zeroed == 2
    assert worst < 1e-5 * 5.0  # float32 run; relative 1e-6 of outputs scaled by w
    assert mf.nfe == steps - 2


def test_cfg_zero_star_conventions():
    mf = ModelFn(_toy_net(), Flow(), "flow")
    x, y = torch.randn(2, 2, 3, dtype=torch.float64), torch.tensor([0, 1])
    unc = {"y": torch.full_like(y, 3)}
    for opts, n_zero in ((dict(zero_steps=1), 1), (dict(zero_steps=1, zero_convention="official"), 2),
                         (dict(zero_steps=0, zero_convention="official"), 1),
                         (dict(zero_fraction=0.04, num_steps=50), 2), (dict(zero_steps=0), 0)):
        g = CFGZeroStar(mf, 3.0, uncond=unc, **opts)
        norms = [g.output(x, t, y=y).abs().max().item() for t in _times(5)[:-1]]
        assert [v == 0.0 for v in norms] == [i < n_zero for i in range(5)], opts
        # a call at a larger time starts a new run: step 0 again
        assert (g.output(x, 1.0, y=y).abs().max().item() == 0.0) == (n_zero > 0)


def test_cfg_zero_star_zero_init_stands_still_for_every_prediction():
    """Zero-init means zero probability-flow velocity for eps / v models too."""
    for prediction in ("eps", "v", "x0"):
        mf = ModelFn(_toy_net(), VP(), prediction)
        g = CFGZeroStar(mf, 3.0, uncond={"y": torch.tensor([3, 3])})
        x = torch.randn(2, 2, 3, dtype=torch.float64)
        x0 = g.predict(x, 0.7, y=torch.tensor([0, 1])).x0
        assert mf.process.velocity(x, x0, 0.7).abs().max().item() < 1e-10


def test_cfg_scale_one_is_the_conditional_model_and_counts_one_nfe():
    mf = ModelFn(_toy_net(), VP(), "eps")
    g = guided(mf, "cfg", 1.0, uncond={"y": torch.tensor([3, 3, 3])})
    x, y = torch.randn(3, 2, 3, dtype=torch.float64), torch.tensor([0, 2, 1])
    for t in (0.9, 0.4, 0.05):
        cond = mf.output(x, t, y=y)
        assert (g.output(x, t, y=y) - cond).abs().max().item() < 1e-12
    assert mf.nfe == 6 and g.nfe == 6  # three cond-only calls + three batched guided calls
    # and w != 1 really guides: the unconditional half is used
    guided3 = CFG(mf, 3.0, {"y": torch.tensor([3, 3, 3])}).output(x, 0.4, y=y)
    assert (guided3 - mf.output(x, 0.4, y=y)).abs().max() > 1e-3


def test_cfg_interval_guides_only_inside():
    mf = ModelFn(_toy_net(), VP(), "eps")
    unc = {"y": torch.tensor([3, 3])}
    x, y = torch.randn(2, 2, 3, dtype=torch.float64), torch.tensor([0, 1])
    g, full = CFG(mf, 4.0, unc, interval=(0.2, 0.6)), CFG(mf, 4.0, unc)
    nfe0 = mf.nfe
    # outside the interval g calls the inner model on the same batch-2 input: bit-identical
    assert (g.output(x, 0.9, y=y) - mf.output(x, 0.9, y=y)).abs().max().item() == 0.0
    assert (g.output(x, 0.4, y=y) - full.output(x, 0.4, y=y)).abs().max().item() < 1e-12
    assert mf.nfe - nfe0 == 4
    # per-sample times straddling the interval: each sample follows its own rule. The mixed call
    # runs the doubled batch-4 forward, the reference a batch-2 one: matmul kernels may sum in
    # another order per batch size (1.1e-16 seen with torch 2.14.1 on one CPU), so a tolerance
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    mixed = g.output(x, t, y=y)
    assert (mixed[0] - mf.output(x, t, y=y)[0]).abs().max().item() < 1e-12
    assert (mixed[1] - full.output(x, t, y=y)[1]).abs().max().item() < 1e-12


def test_apg_degenerates_to_cfg_over_a_run():
    mix = make_class_mixture(num_classes=4, dim=3, seed=1)
    mf = mix.model_fn(VP(), prediction="eps")
    y = torch.tensor([0, 1, 2, 3, 0])
    unc = {"y": torch.full_like(y, 4)}
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = _ddim(APG(mf, 4.0, unc, eta=1.0, r=math.inf, beta=0.0), x, _times(8), y=y)
    c = _ddim(CFG(mf, 4.0, unc), x, _times(8), y=y)
    assert (a - c).abs().max().item() < 1e-10
    # with its defaults APG differs from CFG on the same run
    d = _ddim(APG(mf, 4.0, unc, r=0.25), x, _times(8), y=y)
    assert (d - c).abs().max().item() > 1e-2


def test_apg_forms_agree_at_eta_one_only_without_momentum_and_cap():
    """The docstring's claim: paper form P_c + (w-1) U and diffusers' P_u + w U coincide (= CFG) at
    eta = 1 only when U = Delta, i.e. beta = 0 and the cap inactive; momentum or an active cap makes
    them differ by Delta - U."""
    mf = ModelFn(_toy_net(), Flow(), "flow")
    unc = {"y": torch.tensor([3, 3])}
    x = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y, times = torch.tensor([0, 1]), (0.9, 0.6, 0.3)

    def run(**opts):
        outs = {}
        for form in ("paper", "diffusers"):
            g = APG(mf, 4.0, unc, eta=1.0, space="model_output", form=form, **opts)
            outs[form] = torch.stack([g.output(x, t, y=y) for t in times])
        return outs

    cfg = torch.stack([CFG(mf, 4.0, unc).output(x, t, y=y) for t in times])
    plain = run(beta=0.0, r=None)
    assert (plain["paper"] - plain["diffusers"]).abs().max().item() < 1e-12
    assert (plain["paper"] - cfg).abs().max().item() < 1e-12
    momentum = run(beta=-0.5, r=None)
    assert (momentum["paper"][0] - momentum["diffusers"][0]).abs().max().item() < 1e-12  # no history yet
    assert (momentum["paper"] - momentum["diffusers"]).abs().max().item() > 1e-2
    norms = (mf.output(x, 0.3, y=y) - mf.output(x, 0.3, y=unc["y"])).flatten(1).norm(dim=1)
    capped = run(beta=0.0, r=0.5 * norms.min().item())
    assert (capped["paper"] - capped["diffusers"]).abs().max().item() > 1e-2


def test_apg_norm_cap_default_is_per_space():
    mf = ModelFn(_toy_net(), Flow(), "flow")
    unc = {"y": torch.tensor([3, 3])}
    assert APG(mf, 3.0, unc).r == APG_DEFAULT_R["x0"]
    assert APG(mf, 3.0, unc, space="model_output").r == APG_DEFAULT_R["model_output"]
    assert APG(mf, 3.0, unc, r=2.5).r == 2.5 and APG(mf, 3.0, unc, r=None).r is None
    assert guided(mf, "apg", 3.0, unc, r=math.inf).r is None
    with pytest.raises(ValueError, match="APG r must be a number, None or 'default', got 'large'"):
        APG(mf, 3.0, unc, r="large")
    with pytest.raises(ValueError, match="APG space must be one of"):
        APG(mf, 3.0, unc, space="eps")


def test_apg_momentum_resets():
    mf = ModelFn(_toy_net(), Flow(), "flow")
    unc = {"y": torch.tensor([3, 3])}
    x, y = torch.randn(2, 2, 3, dtype=torch.float64), torch.tensor([0, 1])
    g = APG(mf, 5.0, unc, beta=-0.5, space="model_output")
    first = [g.output(x, t, y=y) for t in (0.9, 0.7)]
    g.reset()
    assert (g.output(x, 0.9, y=y) - first[0]).abs().max().item() == 0.0
    assert (g.output(x, 0.7, y=y) - first[1]).abs().max().item() == 0.0
    # a new run (time goes back up) without reset() also starts a fresh buffer
    assert (g.output(x, 0.9, y=y) - first[0]).abs().max().item() == 0.0


def _class_setup(n=2000):
    # std 0.5: overlapping classes, so the class posterior has room to grow with w
    mix = make_class_mixture(num_classes=10, dim=2, seed=0, std=0.5)
    y = torch.arange(n) % 10
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    data, _ = mix.sample(n, torch.Generator().manual_seed(5), labels=y)
    return mix, y, {"y": torch.full_like(y, 10)}, noise, data


def _class_posterior(mix, x, y):
    """Mean Bayes posterior p(y | x) of the sampled label under the data mixture."""
    var = mix.stds[None] ** 2
    diff = x[:, None] - mix.means[None]
    logits = -0.5 * (torch.log(var) + diff**2 / var).sum(-1)
    return torch.softmax(logits, 1)[torch.arange(len(y)), y].mean().item()


def test_guidance_moves_samples_toward_the_class():
    mix, y, unc, noise, _ = _class_setup()
    mf = mix.model_fn(VP(), prediction="eps")
    # (in this 2-D mixture, with overlapping classes, the posterior peaks near w = 2-3 and falls at
    # larger w as samples are pushed past their class; docs/guidance.md lists the whole curve)
    for kind in ("cfg", "apg", "cfg_zero_star"):
        post = [_class_posterior(mix, _ddim(guided(mf, kind, w, unc), noise, _times(10), y=y), y)
                for w in (1.0, 1.5, 2.0)]
        assert post[0] < post[1] < post[2], kind
        assert post[2] - post[0] > 0.03, kind


def test_apg_keeps_norm_where_cfg_overshoots():
    mix, y, unc, noise, data = _class_setup()
    data_norm = data.norm(dim=1)
    for process, prediction in ((VP(), "eps"), (Flow(), "flow")):
        mf = mix.model_fn(process, prediction=prediction)
        for w in (5.0, 8.0):
            cfg = _ddim(guided(mf, "cfg", w, unc), noise, _times(10), y=y).norm(dim=1)
            apg = _ddim(guided(mf, "apg", w, unc, r=0.25), noise, _times(10), y=y).norm(dim=1)
            assert cfg.mean() > 1.15 * data_norm.mean()
            assert abs(apg.mean() / data_norm.mean() - 1.0) < 0.12
            assert apg.max() < data_norm.max() * 1.05


def test_heavy_ball_recovers_the_solver_update_and_beta_one_is_identity():
    mix, y, unc, noise, _ = _class_setup(200)
    mf = mix.model_fn(VP(), prediction="eps")
    g = guided(mf, "cfg", 3.0, unc)
    base = _ddim(g, noise, _times(8), y=y)
    assert (_ddim(g, noise, _times(8), [HeavyBall(1.0)], y=y) - base).abs().max().item() == 0.0
    # D read back from one DDIM step is exactly the x0 prediction
    hb = HeavyBall(0.5)
    x1 = _ddim(g, noise, _times(8)[:2], y=y)
    x0 = g.predict(noise, 1.0, y=y).x0
    ratio, coef = hb.step_coefficients(mf.process, 1.0, _times(8)[1], noise)
    assert ((x1 - ratio * noise) / coef - x0).abs().max().item() < 1e-9
    # beta < 1 changes the trajectory, and converges (first order) as steps grow
    ref = _ddim(g, noise, _times(400), y=y)
    err = [(_ddim(g, noise, _times(n), [HeavyBall(0.8)], y=y) - ref).norm(dim=1).mean().item()
           for n in (10, 40)]
    assert err[1] < 0.5 * err[0]


def test_heavy_ball_damps_high_guidance_overshoot():
    """At few steps and w = 8, HB (beta=0.8) on DDIM keeps samples closer to the data norm."""
    mix, y, unc, noise, data = _class_setup()
    mf = mix.model_fn(VP(), prediction="eps")
    g = guided(mf, "apg", 8.0, unc, r=1.0)
    plain = _ddim(g, noise, _times(10), y=y).norm(dim=1)
    damped = _ddim(g, noise, _times(10), [HeavyBall(0.8)], y=y).norm(dim=1)
    target = data.norm(dim=1).mean()
    assert (damped.mean() - target).abs() < (plain.mean() - target).abs()
    assert damped.max() < plain.max()
