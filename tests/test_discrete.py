"""Masked diffusion, its Gaussian duality, and Masked Consistency Distillation (arXiv 2602.00792)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from difftools.discrete.distill import distill, distill_loss
from difftools.discrete.duality import GaussianDuality, independent_pair, keep_probability, snr_for_keep
from difftools.discrete.masked import MaskedDiffusion, ancestral_sample
from difftools.discrete.model import TokenTransformer
from difftools.discrete.ngram import CharNGram, unigram_entropy
from difftools.discrete.trainer import fit

V = 16


def _mc_keep(r: float, vocab: int, n: int, gen) -> float:
    """Monte-Carlo P(argmax(r e_0 + eps) = 0), straight from the definition."""
    w = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    w[:, 0] += r
    return (w.argmax(-1) == 0).double().mean().item()


def test_keep_probability_matches_monte_carlo_and_is_monotone():
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for r in (-1.0, 0.0, 0.7, 1.5, 2.5, 3.5):
        p = keep_probability(r, V).item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(_mc_keep(r, V, n, gen) - p) < 4 * sigma + 1e-9, r
    assert keep_probability(0.0, V).item() == pytest.approx(1 / V, abs=1e-9)  # symmetry at r = 0
    grid = keep_probability(torch.linspace(-6, 8, 500).numpy(), V)
    assert (grid.diff() > 0).all()
    assert grid[0] < 1e-3 and grid[-1] > 1 - 1e-6


def test_snr_inverse_round_trip_and_monotone():
    alpha = torch.linspace(0.001, 0.999, 200, dtype=torch.float64)
    r = snr_for_keep(alpha, V)
    assert (r.diff() > 0).all()
    assert (keep_probability(r.numpy(), V) - alpha).abs().max() < 2e-4
    assert snr_for_keep(torch.tensor([0.0, 1.0]), V).tolist() == [-math.inf, math.inf]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_calibrated_latent_keeps_alpha_t(schedule):
    process = MaskedDiffusion(V, schedule)
    duality = GaussianDuality(process)
    gen = torch.Generator().manual_seed(1)
    n = 20000
    x0 = torch.randint(0, V, (n, 1), generator=gen)
    for t in (0.1, 0.3, 0.5, 0.8, 0.95):
        eps = duality.noise(x0, gen)
        z = duality.project(duality.latent(x0, torch.tensor(t), eps), x0)
        alpha = process.alpha(torch.tensor(t)).item()
        rate = (z == x0).double().mean().item()
        assert abs(rate - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / n) + 2e-4, t
        # the threshold form is the same projection, token for token
        assert torch.equal(duality.mask(x0, torch.tensor(t), duality.thresholds(x0, eps)), z)
        assert ((z == x0) | (z == process.mask_id)).all()
    a, s = duality.coefficients(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(a**2 + s**2, torch.ones(3, dtype=torch.float64))


def test_coupled_pairs_are_nested_with_correct_marginals():
    process = MaskedDiffusion(V)
    duality = GaussianDuality(process)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, V, (400, 50), generator=gen)
    t = 0.2 + 0.8 * torch.rand(400, generator=gen, dtype=torch.float64)
    s = t * torch.rand(400, generator=gen, dtype=torch.float64)
    z_t, z_s = duality.coupled_pair(x0, t, s, gen)
    vis_t, vis_s = z_t != process.mask_id, z_s != process.mask_id
    assert (vis_s | ~vis_t).all()  # visible(t) subset of visible(s), 100 %
    assert torch.equal(z_s[vis_t], x0[vis_t])
    for z, tt in ((z_t, t), (z_s, s)):  # each marginal keeps alpha (pooled over the batch's times)
        expected = process.alpha(tt).mean().item() * 50 * 400
        kept = (z != process.mask_id).sum().item()
        assert abs(kept - expected) < 4 * math.sqrt(20000 * 0.25)
    # the baseline's independent masks are not nested: the check above would fail for them
    zi_t, zi_s = independent_pair(process, x0, t, s, gen)
    assert ((zi_t != process.mask_id) & (zi_s == process.mask_id)).float().mean() > 0.02


def test_masked_loss_hand_computed():
    process = MaskedDiffusion(3)
    x0 = torch.tensor([[2, 0]])
    z_t = torch.tensor([[3, 0]])  # position 0 masked
    logits = torch.tensor([[[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]]])
    t = torch.tensor([0.25])
    nll0 = -(2.0 - math.log(1 + math.e + math.e**2))
    expected = (1 / 0.25) * nll0 / 2  # weight -alpha'/(1-alpha) = 1/t, per-token over L = 2
    assert process.loss(logits, x0, z_t, t).item() == pytest.approx(expected, rel=1e-6)
    cos = MaskedDiffusion(3, "cosine")
    w = cos.weight(torch.tensor(0.5)).item()
    assert w == pytest.approx(0.5 * math.pi * math.sin(math.pi / 4) / (1 - math.cos(math.pi / 4)), rel=1e-9)


class _Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, z):
        self.calls += 1
        return self.net(z)


def test_sampler_nfe_no_masks_and_seeded():
    torch.manual_seed(0)
    process = MaskedDiffusion(5)
    net = _Counting(TokenTransformer(5, 12, dim=16, depth=1, heads=2).eval())
    out, nfe = ancestral_sample(net, process, 4, 12, 7, torch.Generator().manual_seed(3))
    assert nfe == 7 and net.calls == 7
    assert out.shape == (4, 12) and (out < 5).all() and (out >= 0).all()
    again, _ = ancestral_sample(net, process, 4, 12, 7, torch.Generator().manual_seed(3))
    other, _ = ancestral_sample(net, process, 4, 12, 7, torch.Generator().manual_seed(4))
    assert torch.equal(out, again) and not torch.equal(out, other)
    with pytest.raises(ValueError, match="steps"):
        ancestral_sample(net, process, 1, 12, 0)


# ---- toy: a low-entropy Markov chain x_{i+1} = x_i + 1 (mod K) w.p. 0.9, else uniform ----
K, L = 4, 8


def _chain(b: int, gen) -> torch.Tensor:
    x = torch.empty(b, L, dtype=torch.long)
    x[:, 0] = torch.randint(0, K, (b,), generator=gen)
    for i in range(1, L):
        jump = torch.rand(b, generator=gen) < 0.1
        x[:, i] = torch.where(jump, torch.randint(0, K, (b,), generator=gen), (x[:, i - 1] + 1) % K)
    return x


def _valid_rate(x: torch.Tensor) -> float:
    """Fraction of transitions following the chain's main rule (0.925 on data)."""
    return ((x[:, 1:] - x[:, :-1]) % K == 1).double().mean().item()


@pytest.fixture(scope="module")
def toy_teacher():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    process = MaskedDiffusion(K)
    model = TokenTransformer(K, L, dim=32, depth=2, heads=2)
    hist = fit(
        model, lambda m, g: process.training_loss(m, _chain(128, g), g), 800, lr=3e-3, warmup=50, seed=0
    )
    return process, model, hist


def test_toy_teacher_learns_the_chain(toy_teacher):
    process, model, hist = toy_teacher
    # NELBO/token starts at ln K = 1.386 (uniform prediction); the chain's entropy rate bound is ~0.48
    assert sum(hist[:20]) / 20 > 1.2
    assert sum(hist[-100:]) / 100 < 0.65  # measured 0.528
    x, _ = ancestral_sample(model, process, 512, L, 32, torch.Generator().manual_seed(0))
    assert _valid_rate(x) > 0.8  # measured 0.87 (data: 0.925)
    one, _ = ancestral_sample(model, process, 512, L, 1, torch.Generator().manual_seed(0))
    assert _valid_rate(one) < 0.4  # one step samples all tokens independently (0.253): the few-step gap


def test_distillation_starts_at_teacher_lowers_its_loss_and_coupling_beats_independent(toy_teacher):
    process, teacher, _ = toy_teacher
    z = torch.randint(0, K + 1, (64, L), generator=torch.Generator().manual_seed(5))
    assert torch.equal(copy.deepcopy(teacher)(z), teacher(z))
    x0 = _chain(4096, torch.Generator().manual_seed(9))

    def held_out_kl(net, coupling="coupled"):
        with torch.no_grad():
            return distill_loss(
                net, teacher, process, x0, 0.25, coupling, torch.Generator().manual_seed(10)
            ).item()

    def few_step_valid(net):  # mean over 4 and 8 sampling steps, 2,048 sequences each
        return (
            sum(
                _valid_rate(ancestral_sample(net, process, 2048, L, n, torch.Generator().manual_seed(0))[0])
                for n in (4, 8)
            )
            / 2
        )

    # KL of the teacher to itself on the SAME input is 0; on the coupled pair (z_t, z_s) it is not
    with torch.no_grad():
        assert distill_loss(teacher, teacher, process, x0[:256], 0.0, "coupled").item() == pytest.approx(
            0, abs=1e-6
        )
    before = held_out_kl(teacher)
    assert before > 0.1  # measured 0.274
    # the independent (stochastic) pair's target is blurrier: its KL is larger at equal dt
    assert held_out_kl(teacher, "independent") > before + 0.03  # measured 0.353
    students = {}
    for coupling in ("coupled", "independent"):
        students[coupling] = copy.deepcopy(teacher)
        hists = distill(
            students[coupling],
            teacher,
            process,
            _chain,
            coupling,
            base_steps=8,
            rounds=2,
            steps_per_round=100,
            batch_size=128,
            lr=1e-3,
            teacher_mode="frozen",
            log=lambda *_: None,
        )
        assert len(hists) == 2 and all(len(h) == 100 for h in hists)
    assert held_out_kl(students["coupled"]) < 0.99 * before  # measured 0.268 vs 0.274 (4,096 sequences)
    # at equal budget the stochastic pairs hurt few-step samples more (measured 0.742 vs 0.765; teacher 0.769)
    assert few_step_valid(students["coupled"]) > few_step_valid(students["independent"]) + 0.01
    with pytest.raises(ValueError, match="coupling"):
        distill_loss(teacher, teacher, process, x0[:4], 0.25, "ode")


def test_fit_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    process = MaskedDiffusion(K)

    def run(steps, ckpt):
        torch.manual_seed(0)
        model = TokenTransformer(K, L, dim=16, depth=1, heads=2)
        if ckpt.is_file():
            pass  # fit reloads the weights, optimiser and data generator
        fit(
            model,
            lambda m, g: process.training_loss(m, _chain(16, g), g),
            steps,
            lr=1e-3,
            warmup=2,
            ckpt=ckpt,
            save_every=3,
            seed=7,
        )
        return model

    straight = run(6, tmp_path / "a.pt")
    run(3, tmp_path / "b.pt")
    resumed = run(6, tmp_path / "b.pt")
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_text_dataset_and_ngram(tmp_path):
    from difftools.data.text import CharText

    with pytest.raises(FileNotFoundError, match="tinyshakespeare.txt"):
        CharText(root=tmp_path)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "tinyshakespeare.txt").write_text("to be or not to be, that is the question\n" * 50)
    data = CharText(root=tmp_path, split="train", seq_len=16, val_fraction=0.2)
    assert data.decode(data.encode("to be")) == "to be"
    assert data[0].shape == (16,) and data.random_batch(3, torch.Generator().manual_seed(0)).shape == (3, 16)
    val = CharText(root=tmp_path, split="val", seq_len=16, val_fraction=0.2)
    ngram = CharNGram(data.ids, data.vocab_size, order=3)
    real = val.ids[:320].reshape(-1, 16)
    shuffled = real.reshape(-1)[torch.randperm(320, generator=torch.Generator().manual_seed(0))].reshape(
        -1, 16
    )
    assert ngram.nll(real) < 0.6 and ngram.nll(shuffled) > 2.5  # measured 0.50 and 2.92 (ln V = 2.71)
    assert unigram_entropy(torch.zeros(10, dtype=torch.long), 4) == 0.0
    assert unigram_entropy(torch.arange(4), 4) == pytest.approx(math.log(4))


def test_corrupt_state_file_is_a_clear_error(tmp_path):
    from difftools.discrete.trainer import load_state, save_state

    good = tmp_path / "ok.pt"
    save_state(good, {"step": 3, "history": [0.5, 0.25], "model": {"w": torch.ones(2)}})
    assert load_state(good)["history"] == [0.5, 0.25]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    from difftools.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(bad)
