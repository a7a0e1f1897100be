"""S³ solver-schedule search (samplers.search) on the Gaussian-mixture harness (float64).

Searched schedules are judged against the exact probability-flow ODE solution (scipy DOP853) on
evaluation noise the search never saw, and against a brute-force optimum of a space small enough to
enumerate; the formulas of the USF step itself are tested in tests/test_usf.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from difftools.process import VP, Flow, as_time
from samplers import ModelFn, sample
from samplers.atomic import atomic_file, write_text_atomic
from samplers.search import (
    BASELINES,
    SearchConfig,
    SearchSpace,
    SolverSchedule,
    baseline_schedule,
    evaluate,
    reference_score,
    schedule_key,
    score_schedule,
    search,
    search_nfes,
)
from samplers.search.space import Rng
from samplers.usf import Strategy
from tests.mixture import make_mixture

REPO = Path(__file__).resolve().parents[1]
DIM, N, NFES = 4, 256, (4, 5)


def blurred_model_fn(mix, process, blur: float = 0.05) -> ModelFn:
    """An imperfect denoiser: the posterior mean at sigma_eff^2 = sigma^2 + (blur alpha)^2 (its error
    grows toward the data end, like a network's; as in scripts/bench_samplers.py)."""

    def net(x_t, t, y=None):
        t64 = as_time(t).to(torch.float64)
        alpha, sigma = process.alpha(t64), process.sigma(t64)
        return mix.posterior_mean(x_t, alpha, torch.sqrt(sigma**2 + (blur * alpha) ** 2)).to(x_t.dtype)

    return ModelFn(net, process, prediction="x0")


def rmse(a, b) -> float:
    return ((a - b) ** 2).mean().sqrt().item()


@pytest.fixture(
    scope="module", params=[("vp", "exact"), ("flow", "blurred")], ids=lambda p: "-".join(map(str, p))
)
def searched(request):
    """One multi-NFE search (4 and 5) per case: budget 300 on 256 search noises, D = 4, the data mean
    offered to the analytical first step; a disjoint set of 256 evaluation noises."""
    torch.set_num_threads(1)
    pname, model = request.param
    mix = make_mixture(dim=DIM, num_components=4, std=0.3, radius=1.5)
    process = VP() if pname == "vp" else Flow()
    mf = mix.model_fn(process) if model == "exact" else blurred_model_fn(mix, process)
    g = torch.Generator().manual_seed(0)
    x_cal = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    x_held = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    score = reference_score(mf, x_cal, ref_solver="unipc_bh2", ref_steps=200)
    mean = (mix.weights[:, None] * mix.means).sum(0)
    res = search_nfes(mf, x_cal, score, NFES, budget=300, seed=0, progress=False, x0_mean=mean)
    truth = mix.ode_reference(process, x_held, 1.0, 1e-3, rtol=1e-10, atol=1e-10)
    return dict(
        mix=mix, process=process, mf=mf, x_cal=x_cal, x_held=x_held, score=score, res=res, truth=truth
    )


def test_search_beats_best_baseline_on_heldout(searched):
    """Selected on the search noises by the distance to the model's own 200-step solution, judged on
    other noises against the exact ODE solution (for the blurred model, not the solution it was
    fitted to): at every NFE below 0.6x the best baseline's error. Measured over search seeds 0-2:
    VP exact 0.21-0.29 (NFE 4), 0.34-0.41 (NFE 5); Flow blurred 0.30-0.41, 0.39-0.42."""
    s = searched
    for nfe, res in s["res"].items():
        base = {
            b: rmse(baseline_schedule(s["process"], b, nfe).sample(s["mf"], s["x_held"]), s["truth"])
            for b in BASELINES
        }
        found = rmse(res.best.sample(s["mf"], s["x_held"]), s["truth"])
        assert found < 0.6 * min(base.values()), (nfe, found, base)
    assert sum(r.evaluations for r in s["res"].values()) == 300 == s["res"][4].total_evaluations


def test_searched_nfe_is_the_calls_made(searched):
    for nfe, res in searched["res"].items():
        mf = searched["mf"].reset()
        x = res.best.sample(mf, searched["x_held"])
        assert res.best.nfe == mf.nfe == nfe
        assert torch.isfinite(x).all()


def test_json_round_trip_gives_identical_samples(searched, tmp_path):
    s = searched
    for nfe, res in s["res"].items():
        best = res.best
        path = best.save(tmp_path / "sub" / f"schedule{nfe}.json")
        loaded = SolverSchedule.load(path)
        assert torch.equal(loaded.times, best.times) and loaded.strategies == best.strategies
        assert torch.equal(loaded.sample(s["mf"], s["x_held"]), best.sample(s["mf"], s["x_held"]))
        assert json.loads(path.read_text())["nfe"] == nfe
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["schedule4.json", "schedule5.json"]


def test_same_seed_same_result_other_seed_differs():
    torch.set_num_threads(1)
    mix = make_mixture(dim=2, num_components=3, std=0.3, radius=1.5)
    mf = mix.model_fn(VP())
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    score = reference_score(mf, x, ref_steps=100)
    cfg = SearchConfig(budget=80, population=12)
    a = search(mf, x, score, 4, config=cfg, seed=7, progress=False)
    b = search(mf, x, score, 4, config=cfg, seed=torch.Generator().manual_seed(7), progress=False)
    c = search(mf, x, score, 4, config=cfg, seed=8, progress=False)
    assert a.history == b.history and a.best.to_dict() == b.best.to_dict()
    assert not torch.equal(a.best.times, c.best.times) or a.best.strategies != c.best.strategies
    # at 4 steps DPM-Solver++ 3M is 2M (lower-order start and final steps): scored once, reported for both
    assert set(a.baselines) == set(BASELINES) and a.baselines["dpmpp_3m"] == a.baselines["dpmpp_2m"]


# A small space that can be enumerated: NFE 3 on the logSNR grid (times fixed), per step prediction
# data | noise, Taylor order 1 | 2, estimate order (nodes) order - 1 .. 2, coefficient taylor | bh2,
# corrector none | pseudo; no relaxation, no analytical first step, no implicit corrector.
SMALL_SPACE = dict(
    predictions=("data", "noise"),
    order_weights=(0.5, 0.5),
    max_nodes=2,
    coefs=("taylor", "bh2"),
    correctors=(None, "pseudo"),
    relax_sigma=0.0,
    afs=(),
    allow_implicit=False,
    time_prob=0.0,
    time_jitter=0.0,
    structural_prob=0.0,
)


def _small_space_options(i: int) -> list[Strategy]:
    out = []
    for prediction, order, coef, corrector in itertools.product(
        ("data", "noise"), (1, 2), ("taylor", "bh2"), (None, "pseudo")
    ):
        if order > i + 1:
            continue
        node_sets = [None] + (
            [tuple(range(1, q + 1)) for q in range(order, min(2, i) + 1)] if order > 1 else []
        )
        out += [Strategy(prediction, order, coef, corrector, nodes) for nodes in node_sets]
    return out


def test_search_finds_the_brute_force_optimum_of_a_small_space():
    """Exact mixture (VP, 2-D), score = RMSE to the exact ODE solution on 64 fixed noises. Brute force
    over the 840 distinct schedules of SMALL_SPACE gives the optimum; the search (budget 150 = 18 % of
    the space) must come within x = 1 % of it for each of 3 search seeds. Why 1 %: the 3 best of the
    840 schedules lie within 0.15 % of the optimum and the next one 4.1 % above it, so any x in
    [0.15 %, 4.1 %) asks for one of those 3; a random search of the same budget finds one with
    probability 1 - (1 - 3/840)^150 = 41 % per seed (7 % for all three seeds), the evolution did for
    10 of 10 seeds (0-9) when this test was written (8 of 10 already at budget 100)."""
    torch.set_num_threads(1)
    mix = make_mixture(dim=2, num_components=3, std=0.3, radius=1.5)
    process = VP()
    mf = mix.model_fn(process)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = mix.ode_reference(process, x, 1.0, 1e-3, rtol=1e-10, atol=1e-10)

    def score(samples):
        return rmse(samples, truth)

    times = baseline_schedule(process, "ddim", 3).times
    scores = {}
    for combo in itertools.product(*(_small_space_options(i) for i in range(3))):
        sched = SolverSchedule(times, list(combo), process)
        key = schedule_key(sched)
        if key not in scores:
            scores[key] = score_schedule(sched, mf, x, score)
    assert len(scores) == 840
    optimum = min(scores.values())
    assert sum(v <= 1.01 * optimum for v in scores.values()) == 3
    cfg = SearchConfig(**SMALL_SPACE)
    for seed in range(3):
        res = search(
            mf,
            x,
            score,
            3,
            budget=150,
            config=cfg,
            baselines=("ddim", "unipc_bh2"),
            seed=seed,
            progress=False,
        )
        assert schedule_key(res.best) in scores  # the search stayed inside the enumerated space
        assert res.best_score <= 1.01 * optimum, (seed, res.best_score / optimum)


def test_t_end_is_a_searched_decision():
    """Score = RMSE to the exact ODE solution at t = 0.3 (not the default t_end 1e-3): with
    t_end_range (1e-3, 0.6) the search moves t_end there (measured 0.27-0.35 for seeds 0-3) and scores
    0.11x the best baseline (which ends at 1e-3)."""
    torch.set_num_threads(1)
    mix = make_mixture(dim=2, num_components=3, std=0.3, radius=1.5)
    process = VP()
    mf = mix.model_fn(process)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = mix.ode_reference(process, x, 1.0, 0.3, rtol=1e-10, atol=1e-10)
    cfg = SearchConfig(t_end_range=(1e-3, 0.6))
    res = search(mf, x, lambda s: rmse(s, target), 4, budget=150, config=cfg, seed=0, progress=False)
    assert 0.24 < float(res.best.times[-1]) < 0.375
    assert res.best_score < 0.3 * min(res.baselines.values())


def test_space_covers_every_decision_and_keeps_the_nfe():
    """Children of NFE 5 from random parents of NFE 4, 5 and 6 (Flow, data mean offered, t_end range):
    most draws give a child (measured 530 of 550), every child spends exactly 5 evaluations (counted on
    a run), and the children use every decision: 4 to 6 steps, the analytical first step (zero and
    mean), implicit correctors, more estimate nodes than order - 1, relaxation, order 4, moved t_end."""
    cfg = SearchConfig(t_end_range=(1e-3, 1e-2))
    mean = torch.tensor([0.1, -0.2], dtype=torch.float64)
    space = SearchSpace(Flow(), 1.0, 1e-3, cfg, Rng(torch.Generator().manual_seed(0)), x0_mean=mean)
    mix = make_mixture(dim=2, num_components=3)
    x = torch.randn(4, 2, dtype=torch.float64)
    seen, tried, made = set(), 0, 0
    for k in range(300):
        parent = space.random(4 + k % 3)
        if parent is None:
            continue
        tried += 1
        child = space.child(parent, 5)
        if child is None:
            continue
        made += 1
        mf = mix.model_fn(Flow())
        child.sample(mf, x)
        assert mf.nfe == child.nfe == 5
        seen.add(f"steps{child.steps}")
        afs = child.strategies[0].afs
        seen |= {"afs_zero"} if afs == (0.0,) else ({"afs_mean"} if afs is not None else set())
        for s in child.strategies:
            seen |= {"implicit"} if s.corrector == "implicit" else set()
            seen |= {"extra_nodes"} if s.nodes is not None and len(s.nodes) > s.order - 1 else set()
            seen |= {"relax"} if s.relax != 0 else set()
            seen |= {"order4"} if s.order == 4 else set()
        seen |= {"t_end_moved"} if float(child.times[-1]) != float(parent.times[-1]) else set()
    assert made > 0.8 * tried
    expected = {"steps4", "steps5", "steps6", "afs_zero", "afs_mean", "implicit", "extra_nodes", "relax"}
    assert expected | {"order4", "t_end_moved"} <= seen, seen


def test_evaluate_reports_on_other_noise():
    """search.evaluate scores given schedules on another noise set with the same machinery; batching
    does not change a sample, and a model whose calls disagree with the plan is caught."""
    mix = make_mixture(dim=2, num_components=3)
    process = VP()
    mf = mix.model_fn(process)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    truth = mix.ode_reference(process, x, 1.0, 1e-3, rtol=1e-10, atol=1e-10)
    scheds = {b: baseline_schedule(process, b, 5) for b in ("ddim", "unipc_bh2")}
    got = evaluate(mf, scheds, x, lambda s: rmse(s, truth), batch_size=3)
    assert got == {b: rmse(sch.sample(mf, x), truth) for b, sch in scheds.items()}
    assert got["unipc_bh2"] < got["ddim"]

    class Twice(ModelFn):  # evaluates twice per call: the plan's NFE no longer matches
        def predict(self, x, t, **cond):
            super().predict(x, t, **cond)
            return super().predict(x, t, **cond)

    with pytest.raises(RuntimeError, match="plan NFE 5 differs from the 10 calls"):
        evaluate(Twice(mf.net, process, "x0"), {"ddim": scheds["ddim"]}, x, lambda s: 0.0)


def test_baseline_schedule_spends_exactly_the_nfe():
    # Flow from t = 1: the infinite first step has no intermediate stage, so 2S costs one less
    assert baseline_schedule(Flow(), "dpmpp_2s", 5).steps == 3
    assert baseline_schedule(VP(), "heun", 6).steps == 3
    with pytest.raises(ValueError, match="cannot spend exactly 5"):
        baseline_schedule(VP(), "heun", 5)


def test_nfe_counts_correctors_and_stages():
    process = VP()
    mix = make_mixture(dim=2, num_components=3)
    x_T = torch.randn(4, 2, dtype=torch.float64)
    times = torch.tensor([1.0, 0.6, 0.3, 0.1, 1e-3], dtype=torch.float64)
    cases = [
        ([Strategy("data", 1)] * 4, 4),
        (
            [Strategy("data", 2, "bh2", "pseudo")] * 4,
            4,
        ),  # UniC reuses its evaluation; skipped on the last step
        ([Strategy("data", 1, corrector="implicit")] + [Strategy("noise", 2)] * 3, 5),
        (
            [Strategy("data", 1)] * 3 + [Strategy("noise", 1, "bh2", "implicit")],
            5,
        ),  # implicit on the last step
        ([Strategy("data", 2, singlestep=(0.5,))] + [Strategy("data", 3, singlestep=(1 / 3, 2 / 3))] * 3, 11),
        # analytical first step: no evaluation at t_0 (its later use as a history node costs nothing)
        ([Strategy("data", 1, afs=(0.0,))] + [Strategy("data", 3, nodes=(1, 2))] * 3, 3),
        ([Strategy("noise", 1, afs=(0.2, -0.1), corrector="pseudo")] + [Strategy("data", 2)] * 3, 3),
    ]
    for strategies, nfe in cases:
        sched = SolverSchedule(times, strategies, process)
        mf = mix.model_fn(process)
        sched.sample(mf, x_T)
        assert sched.nfe == mf.nfe == nfe, strategies
    # Flow from t = 1: no corrector on the infinite first step, so "implicit" there costs nothing
    flow = SolverSchedule(
        times, [Strategy("data", 1, corrector="implicit")] + [Strategy("data", 1)] * 3, Flow()
    )
    mf = mix.model_fn(Flow())
    flow.sample(mf, x_T)
    assert flow.nfe == mf.nfe == 4


def test_nonfinite_candidates_score_inf_and_the_search_goes_on():
    """A model that returns NaN for t in (0.45, 0.55): every logSNR baseline at NFE 5 (VP) has a point
    there and scores inf; the search still finds finite schedules that avoid the band."""
    process = VP()
    mix = make_mixture(dim=2, num_components=3)
    exact = mix.denoiser(process)

    def net(x, t, y=None):
        out = exact(x, t)
        bad = (as_time(t) > 0.45) & (as_time(t) < 0.55)
        return torch.where(bad.reshape(-1, 1), torch.full_like(out, math.nan), out)

    mf = ModelFn(net, process, "x0")
    base_times = baseline_schedule(process, "ddim", 5).times
    assert ((base_times > 0.45) & (base_times < 0.55)).any()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(mix.model_fn(process), x, "unipc_bh2", steps=100)
    res = search(
        mf, x, lambda s: rmse(s, ref), 5, budget=60, seed=0, progress=False, config=SearchConfig(afs=())
    )
    assert all(math.isinf(v) for v in res.baselines.values())
    # measured 0.040; the best baseline on the NaN-free model scores 0.124
    assert math.isfinite(res.best_score) and res.best_score < 0.1
    assert not ((res.best.times > 0.45) & (res.best.times < 0.55)).any()


def _valid_dict():
    sched = baseline_schedule(VP(), "unipc_bh2", 4)
    return sched.to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["times"].reverse(), "strictly decreasing"),
        (lambda d: d["strategies"].pop(), "one strategy per step"),
        (lambda d: d["strategies"][1].update(prediction="velocity"), "prediction must be one of"),
        (lambda d: d["strategies"][1].update(order=7), "order must be in"),
        (lambda d: d["strategies"][0].update(coefficient="bh2"), "unknown keys"),
        (lambda d: d.update(nfe=9), "stored nfe 9 differs"),
        (lambda d: d.update(format="other"), "not a solver schedule"),
        (lambda d: d.update(process={"kind": "Cosmic"}), "bad process"),
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d["times"].__setitem__(2, "x"), "list of numbers"),
        (lambda d: d.update(version=3), "unsupported schedule version 3"),
        (lambda d: d["strategies"][1].update(relax="big"), "relax must hold numbers"),
        (lambda d: d["strategies"][2].update(afs=[0.0]), "step 2: the analytical first step"),
        (lambda d: d["strategies"][3].update(nodes=[2, 1]), "strictly increasing"),
        (lambda d: d["strategies"][3].update(order=4, nodes=[1, 2]), "order 4 needs at least 3 nodes"),
        # version 1 files predate relax / afs: those keys there mean a hand-edited or corrupt file
        (
            lambda d: (d.update(version=1), d["strategies"][0].update(relax=0.1)),
            "unknown keys \\['afs', 'relax'\\]; expected \\['prediction'",
        ),
    ],
)
def test_invalid_schedule_file_raises_clear_error(tmp_path, edit, message):
    d = _valid_dict()
    edit(d)
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        SolverSchedule.load(path)


def test_version_1_file_reads_as_before(tmp_path):
    """A version 1 file (no relax / afs keys, as the previous release wrote it) loads and samples
    exactly like the same schedule written now; it is saved back as version 2."""
    v1 = {
        "format": "difftools.solver_schedule",
        "version": 1,
        "name": "searched",
        "process": VP().config(),
        "times": [1.0, 0.6, 0.3, 0.05, 0.001],
        "strategies": [
            {
                "prediction": "data",
                "order": 1,
                "coef": "taylor",
                "corrector": None,
                "nodes": None,
                "singlestep": None,
            },
            {
                "prediction": "noise",
                "order": 2,
                "coef": "bh2",
                "corrector": "pseudo",
                "nodes": None,
                "singlestep": None,
            },
            {
                "prediction": "data",
                "order": 3,
                "coef": "dpm",
                "corrector": None,
                "nodes": None,
                "singlestep": None,
            },
            {
                "prediction": "data",
                "order": 2,
                "coef": "bh1",
                "corrector": None,
                "nodes": None,
                "singlestep": None,
            },
        ],
        "nfe": 4,
        "info": {"score": 0.1},
    }
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    old = SolverSchedule.load(path)
    now = SolverSchedule(
        torch.tensor(v1["times"], dtype=torch.float64),
        [
            Strategy("data", 1),
            Strategy("noise", 2, "bh2", "pseudo"),
            Strategy("data", 3, "dpm"),
            Strategy("data", 2, "bh1"),
        ],
        VP(),
    )
    mf = make_mixture(dim=2).model_fn(VP())
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(old.sample(mf, x), now.sample(mf, x)) and old.nfe == 4
    assert old.to_dict()["version"] == 2 and old.to_dict()["strategies"][1]["relax"] == 0.0


def test_corrupt_or_missing_file(tmp_path):
    path = tmp_path / "schedule.json"
    baseline_schedule(VP(), "ddim", 4).save(path)
    path.write_text(path.read_text()[:-20])  # truncated write
    with pytest.raises(ValueError, match="not a valid JSON schedule"):
        SolverSchedule.load(path)
    with pytest.raises(FileNotFoundError, match="search_schedule.py"):
        SolverSchedule.load(tmp_path / "missing.json")


def test_failed_save_keeps_the_previous_schedule_file(tmp_path):
    """A schedule whose info cannot be written as JSON: the error names the bad value, the file from the
    previous save is untouched and no temporary file is left beside it."""
    path = tmp_path / "schedule.json"
    good = baseline_schedule(VP(), "ddim", 4)
    good.save(path)
    before = path.read_text()
    bad = baseline_schedule(VP(), "dpmpp_2m", 4)
    bad.info = {"score": object()}
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        bad.save(path)
    assert path.read_text() == before and SolverSchedule.load(path).name == "ddim"
    assert [p.name for p in tmp_path.iterdir()] == ["schedule.json"]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    """samplers.atomic.atomic_file: a crash while writing leaves the old content and no temporary file;
    a finished write replaces the file; a missing parent folder is created."""
    path = tmp_path / "deep" / "out.txt"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_file(path) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old\n" and [p.name for p in path.parent.iterdir()] == ["out.txt"]
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".out.txt.")
        assert tmp.name.endswith(".partial")
        tmp.write_text("new\n")
    assert path.read_text() == "new\n" and [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_process_mismatch_and_reference_score():
    mix = make_mixture(dim=2, num_components=3)
    sched = baseline_schedule(VP(), "ddim", 4)
    x = torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="was made for process"):
        sched.sample(mix.model_fn(Flow()), x)
    mf = mix.model_fn(VP())
    score = reference_score(mf, x, ref_solver="dpmpp_3m", ref_steps=30)
    assert score(sample(mf, x, "dpmpp_3m", steps=30)) == 0.0
    assert abs(score(score.reference + 0.5) - 0.5) < 1e-12
    with pytest.raises(ValueError, match="do not match"):
        score(x[:4])


def test_sample_script_accepts_schedule_file(tmp_path):
    spec = importlib.util.spec_from_file_location("sample_script_s3", REPO / "scripts" / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sched = baseline_schedule(Flow(), "unipc_bh2", 5)
    sched.save(tmp_path / "schedule.json")
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.ckpt, cfg.schedule_file = "unused", str(tmp_path / "schedule.json")
    got = mod.build_spec(cfg)
    assert got.sampler == "usf" and got.steps == 5
    assert got.sampler_opts["times"] == sched.times.tolist()
    assert got.sampler_opts["strategies"][0] == {
        "prediction": "data",
        "order": 2,
        "coef": "bh2",
        "corrector": "pseudo",
        "nodes": None,
        "singlestep": None,
        "relax": 0.0,
        "afs": None,
    }


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_search_gpu_script_smoke(tmp_path):
    """scripts/search_gpu.py --smoke (tiny random DiT, CPU): the grid, the multi-NFE search, the
    evaluation on sets A and B and the report run end to end; each stage's output is reused by the
    next invocation, and a stage run before its inputs exist says what to run first."""
    mod = _load_script("search_gpu")
    out = tmp_path / "s3"
    with pytest.raises(SystemExit, match="run --stage grid and --stage search"):
        mod.main(["--smoke", "--out", str(out), "--stage", "eval", "--no-progress"])
    mod.main(["--smoke", "--out", str(out), "--no-progress", "--threads", "1"])
    grid = json.loads((out / "grid.json").read_text())
    # ddim and unipc_bh2 x 3 grids x DualFast off/on at NFE 3 and 4
    assert {(r["nfe"], r["config"]) for r in grid["rows"]} >= {
        (3, "ddim@karras+dualfast"),
        (4, "unipc_bh2@logsnr"),
    }
    assert len(grid["rows"]) == 24
    found = json.loads((out / "search.json").read_text())
    assert sum(d["evaluations"] for d in found["per_nfe"].values()) == found["evaluations"] == 40
    for nfe in (3, 4):
        sched = SolverSchedule.load(out / f"schedule_nfe{nfe}.json")
        assert sched.nfe == nfe and sched.info["metric"] == "fd_random_projection"
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert sorted((r["nfe"], r["kind"]) for r in rows) == [
        (3, "hand-picked"),
        (3, "searched"),
        (4, "hand-picked"),
        (4, "searched"),
    ]
    hand = [r for r in rows if r["kind"] == "hand-picked" and r["nfe"] == 4][0]
    best = min((r for r in grid["rows"] if r["nfe"] == 4), key=lambda r: r["score"])
    assert hand["config"] == best["config"] and hand["search_score"] == best["score"]
    assert all(math.isfinite(r["score_A"]) and math.isfinite(r["score_B"]) for r in rows)
    table = (out / "results.md").read_text()
    assert "| 4 | " + hand["config"] in table and "S*/B* on A" in table
    before = (out / "search.json").read_text()
    mod.main(["--smoke", "--out", str(out), "--stage", "search", "--no-progress"])  # exists: skipped
    assert (out / "search.json").read_text() == before


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: SearchConfig(order_weights=(0.2, 0.4, 0.3, 0.1), max_nodes=2),
            "max_nodes = 2 cannot estimate",
        ),
        (lambda: SearchConfig(t_end_range=(0.01, 0.001)), "t_end_range must be \\(lo, hi\\)"),
        (lambda: SearchConfig(coefs=("taylor", "exact")), "coefs must be distinct values"),
        (lambda: SearchConfig(afs=("mean", "mean")), "afs must be distinct values"),
        (lambda: SearchConfig(migrate_prob=1.5), "migrate_prob must be in \\[0, 1\\]"),
        (lambda: SearchConfig(time_budget_s=0), "time_budget_s must be > 0"),
        (
            lambda: SearchSpace(
                VP(), 1.0, 0.05, SearchConfig(t_end_range=(1e-3, 1e-2)), Rng(torch.Generator())
            ),
            "t_end = 0.05 lies outside t_end_range",
        ),
        (
            lambda: search_nfes(make_mixture().model_fn(VP()), torch.zeros(2, 2), lambda s: 0.0, [4, 4]),
            "nfes must be distinct integers >= 1",
        ),
    ],
)
def test_search_settings_errors_name_the_setting(build, message):
    with pytest.raises(ValueError, match=message):
        build()
