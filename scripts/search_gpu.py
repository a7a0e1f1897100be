#!/usr/bin/env python
"""S³ acceptance: searched solver schedules vs the best hand-picked configuration at several NFEs.

    # GPU acceptance (issue 13) on the shared CIFAR-10 DiT-T/2 flow model; each stage fits a 10-minute
    # command, a stage whose output exists is skipped (rerun with --force), so run them one by one:
    python scripts/search_gpu.py --ckpt <CIFAR-10 flow DiT checkpoint dir> --features <classifier dir> \\
        --ref-stats <train-split stats .npz> --nfes 4,5,6,8 --n-search 1000 --n-eval 10000 \\
        --search-minutes 8 --afs-mean data --out runs/s3_gpu --stage grid      # then search, eval, report
    # CPU: a trained digits DiT (the metric classifier is trained and cached when missing)
    python scripts/search_gpu.py --ckpt runs/dit/<date> --nfes 4,5,6 --n-search 256 --n-eval 1000 \\
        --budget 450 --out docs/search/digits_multi
    # CPU: the Gaussian-mixture harness (RMSE to the exact ODE solution instead of fd)
    python scripts/search_gpu.py --mixture vp-exact --nfes 4,5,6 --budget 600 --out docs/search/mixture_vp
    # CPU smoke (tiny random DiT, random-projection features, < 1 min)
    python scripts/search_gpu.py --smoke --out /tmp/s3_smoke

Protocol (docs/search.md, "Acceptance protocol and decision rule"): three disjoint noise sets — search
(``--search-seed``), evaluation A (``--eval-seed-a``) and B (``--eval-seed-b``), image i from the pair
[seed, i] with label i mod num_classes.

* ``grid``: every named solver x grid {logsnr, uniform_t, karras} x DualFast {off, on} that spends
  exactly the NFE, scored on the search set; B*(n) = the lowest score at NFE n.
* ``search``: one steady-state evolution over all NFEs (:func:`samplers.search.search_nfes`), scored
  on the search set, stopped by ``--search-minutes`` (wall clock, the "GPU-minutes" of the report) or
  ``--budget`` candidates; S*(n) = its best at NFE n.
* ``eval``: B*(n) and S*(n) on evaluation sets A and B (``--n-eval`` each, fd + class accuracy);
  the A/A difference of B* between A and B is the noise the decision rule compares against.
* ``report``: the markdown table (``results.md``) with the search cost.

Score: Fréchet distance of the decoded uint8 samples to ``--ref-stats`` in the ``--features`` space
(``inception`` or a classifier checkpoint directory; default: the dataset's metric classifier and its
training-split statistics, computed and cached when missing). Everything is computed by library
functions (``samplers.search``, ``difftools.metrics``); this file only wires them.
"""

from __future__ import annotations

import abc
import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samplers import ModelFn, sample  # noqa: E402
from samplers.atomic import write_text_atomic  # noqa: E402
from samplers.sampling import SOLVERS  # noqa: E402
from samplers.search import (  # noqa: E402
    BASELINES,
    SearchConfig,
    SolverSchedule,
    baseline_schedule,
    search_nfes,
)

GRIDS = ("logsnr", "uniform_t", "karras")


# ----------------------------------------------------------------------------------------- tasks
class Task(abc.ABC):
    """A model to sample from, its noise sets and its score (lower is better)."""

    name: str = ""
    metric: str = ""
    num_classes: int = 0
    device = torch.device("cpu")
    x0_mean = None

    @abc.abstractmethod
    def inputs(self, seed: int, n: int) -> tuple[torch.Tensor, dict]:
        """The noise set ``[seed, i]``, i < n, and its conditioning (e.g. labels i mod classes)."""

    @abc.abstractmethod
    def scorer(self, x_T: torch.Tensor, cond: dict):
        """``score(samples) -> float`` for samples drawn from this noise set."""

    def accuracy(self, samples: torch.Tensor, cond: dict) -> float | None:
        return None


class CheckpointTask(Task):
    """A difftools checkpoint; fd in a feature space to reference statistics."""

    def __init__(self, args):
        import difftools
        from difftools.metrics.fid import float_to_uint8

        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = difftools.load(args.ckpt, device=self.device)
        model = loaded.model.eval()
        self.dataset, self.image_size, _ = loaded.reference_dataset()
        ae = loaded.autoencoder
        self.decode = (lambda z: ae.decode(z)) if ae is not None else (lambda z: z)
        self.shape = (model.in_channels, model.input_size, model.input_size)
        info = loaded.dataset_info or {}
        self.num_classes = int(info.get("num_classes", getattr(model, "num_classes", 0) or 0))
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True

        def net(x, t, **cond):
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
            with ctx:
                return model(x, t, **cond)

        self.mf = ModelFn(net, loaded.process, loaded.prediction)
        self.to_uint8 = lambda x: float_to_uint8(self.decode(x).float().clamp(-1, 1))
        self.name = str(loaded.path)
        self._features(args)
        self.x0_mean = self._data_mean(args.afs_mean, ae)

    def _features(self, args) -> None:
        from difftools.metrics.evaluate import build_features
        from difftools.metrics.fid import Stats, reference_stats

        self.extractor = build_features(args.features, self.dataset, self.image_size, device=self.device)
        self.metric = self.extractor.metric
        if args.ref_stats:
            self.ref = Stats.load(args.ref_stats)
        else:
            self.ref = reference_stats(
                self.dataset, self.extractor, split="train", image_size=self.image_size
            )

    def _data_mean(self, kind: str, ae):
        if kind == "none":
            return None
        if kind == "zero":
            return torch.zeros(())
        from difftools.models.autoencoders.base import IdentityAutoencoder

        if ae is not None and not isinstance(ae, IdentityAutoencoder):
            raise SystemExit(
                "error: --afs-mean data needs a pixel-space model (the mean of decoded images is not a "
                "latent mean); use --afs-mean zero or none"
            )
        from difftools.data import build_dataset
        from difftools.metrics.classifier import dataset_tensors

        images, _ = dataset_tensors(build_dataset(self.dataset, split="test", image_size=self.image_size))
        return (images.double() / 127.5 - 1.0).mean(0)

    def inputs(self, seed, n):
        from difftools.metrics.generate import image_noise

        sigma = float(self.mf.process.sigma(torch.tensor(1.0)))
        x_T = (sigma * image_noise(seed, range(n), self.shape)).to(self.device)
        cond = {"y": (torch.arange(n) % self.num_classes).to(self.device)} if self.num_classes else {}
        return x_T, cond

    def images(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.to_uint8(x[i : i + 1000]).cpu() for i in range(0, len(x), 1000)])

    def scorer(self, x_T, cond):
        from difftools.metrics.fid import fd, gaussian_fit

        def score(x):
            imgs = self.images(x)
            bs = self.extractor.batch_size
            feats = torch.cat([self.extractor(imgs[i : i + bs]) for i in range(0, len(imgs), bs)])
            return fd(gaussian_fit(feats.double().numpy()), self.ref)

        return score

    def accuracy(self, samples, cond):
        from difftools.metrics.classifier import class_accuracy
        from difftools.metrics.features import ClassifierFeatures

        if "y" not in cond or not isinstance(self.extractor, ClassifierFeatures):
            return None
        return class_accuracy(self.extractor, self.images(samples), cond["y"].cpu())


class SmokeTask(CheckpointTask):
    """A tiny random DiT (weights ~ N(0, 0.1), so that solvers differ) and random-projection features;
    the reference statistics are those of fixed random images."""

    def __init__(self, args):
        from difftools.metrics.fid import float_to_uint8, gaussian_fit
        from difftools.models.dit import DiT
        from difftools.process import Flow

        torch.manual_seed(0)
        net = DiT(
            input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10
        )
        with torch.no_grad():
            for prm in net.parameters():
                prm.normal_(0.0, 0.1)
        net.eval()
        self.mf = ModelFn(net, Flow(), "flow")
        self.shape, self.num_classes, self.name = (3, 8, 8), 10, "smoke (random DiT)"
        self.decode = lambda z: z
        self.to_uint8 = lambda x: float_to_uint8(x.float().clamp(-1, 1))
        proj = torch.randn(3 * 8 * 8, 8, generator=torch.Generator().manual_seed(0))
        self.extractor = lambda imgs: imgs.float().flatten(1) @ proj / 100.0
        self.extractor.batch_size = 10**9
        self.metric = "fd_random_projection"
        ref_imgs = torch.randint(
            0, 256, (256, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
        )
        self.ref = gaussian_fit(self.extractor(ref_imgs).double().numpy())
        self.x0_mean = torch.zeros(())

    def accuracy(self, samples, cond):
        return None


class MixtureTask(Task):
    """The Gaussian-mixture harness of tests/test_search.py: 4-D, 4 components, exact or blurred
    denoiser, VP or Flow; score = RMSE of x(t_end) to the exact ODE solution of the same noise."""

    def __init__(self, args):
        from difftools.process import VP, Flow, as_time
        from tests.mixture import make_mixture

        pname, model = args.mixture.split("-")
        self.mix = make_mixture(dim=4, num_components=4, std=0.3, radius=1.5)
        process = {"vp": VP(), "flow": Flow()}[pname]
        if model == "exact":
            self.mf = self.mix.model_fn(process)
        elif model == "blurred":  # the posterior mean at sigma_eff^2 = sigma^2 + (0.05 alpha)^2

            def net(x_t, t, y=None):
                t64 = as_time(t).to(torch.float64)
                a, s = process.alpha(t64), process.sigma(t64)
                return self.mix.posterior_mean(x_t, a, torch.sqrt(s**2 + (0.05 * a) ** 2)).to(x_t.dtype)

            self.mf = ModelFn(net, process, "x0")
        else:
            raise SystemExit(f"error: --mixture must be vp|flow-exact|blurred, got {args.mixture!r}")
        self.name, self.metric, self.t_end = f"mixture {args.mixture}", "rmse_to_exact_ode", args.t_end
        self.x0_mean = (
            (self.mix.weights[:, None] * self.mix.means).sum(0) if args.afs_mean == "data" else None
        )

    def inputs(self, seed, n):
        return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), {}

    def scorer(self, x_T, cond):
        truth = self.mix.ode_reference(self.mf.process, x_T, 1.0, self.t_end, rtol=1e-10, atol=1e-10)
        return lambda x: float(((x - truth) ** 2).mean().sqrt())


# ----------------------------------------------------------------------------------------- sampling
def draw(task: Task, sched: SolverSchedule, x_T, cond, batch: int, dualfast: bool = False) -> torch.Tensor:
    """The schedule's samples from x_T (batches of ``batch``; DualFast as in ``samplers.sample``)."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(x_T), batch):
            part = {k: v[i : i + batch] for k, v in cond.items()}
            outs.append(
                sample(
                    task.mf,
                    x_T[i : i + batch],
                    "usf",
                    times=sched.times,
                    strategies=sched.strategies,
                    dualfast=dualfast,
                    **part,
                )
            )
    return torch.cat(outs)


def config_name(solver: str, grid: str, dualfast: bool) -> str:
    return f"{solver}@{grid}" + ("+dualfast" if dualfast else "")


def hand_picked(task: Task, nfe: int, t_end: float, solvers):
    """(solver, grid, dualfast, schedule) of every solver x grid x DualFast that spends exactly ``nfe``."""
    for solver in solvers:
        for grid in GRIDS:
            try:
                sched = baseline_schedule(task.mf.process, solver, nfe, t_end=t_end, schedule=grid)
            except ValueError:
                continue
            for df in (False, True):
                yield solver, grid, df, sched


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------- stages
def stage_grid(task, args, log):
    path = args.out / "grid.json"
    done = read_json(path) if not args.force else None
    rows = (done or {}).get("rows", [])
    have = {(r["nfe"], r["config"]) for r in rows}
    x_T, cond = task.inputs(args.search_seed, args.n_search)
    score = task.scorer(x_T, cond)
    t0 = time.time()
    for nfe in args.nfes:
        for solver, grid, df, sched in hand_picked(task, nfe, args.t_end, args.solvers):
            name = config_name(solver, grid, df)
            if (nfe, name) in have:
                continue
            try:
                value = score(draw(task, sched, x_T, cond, args.batch, df))
            except (torch.linalg.LinAlgError, OverflowError, ZeroDivisionError):
                value = math.inf
            value = value if math.isfinite(value) else math.inf
            rows.append(dict(nfe=nfe, config=name, solver=solver, grid=grid, dualfast=df, score=value))
            write_text_atomic(path, json.dumps(dict(rows=rows, seconds=time.time() - t0), indent=1))
            log(f"grid NFE {nfe} {name}: {value:.5g}")
    return rows


def stage_search(task, args, log):
    path = args.out / "search.json"
    if path.is_file() and not args.force:
        log(f"{path} exists; skipping the search (--force to redo it)")
        return read_json(path)
    x_T, cond = task.inputs(args.search_seed, args.n_search)
    cfg = SearchConfig(
        budget=args.budget,
        time_budget_s=None if args.search_minutes is None else 60.0 * args.search_minutes,
        t_end_range=None
        if args.t_end_range is None
        else tuple(float(v) for v in args.t_end_range.split(",")),
    )
    t0 = time.time()
    results = search_nfes(
        task.mf,
        x_T,
        task.scorer(x_T, cond),
        args.nfes,
        cond=cond,
        t_end=args.t_end,
        config=cfg,
        baselines=BASELINES,
        baseline_grids=GRIDS,
        x0_mean=task.x0_mean,
        seed=args.seed,
        batch_size=args.batch,
        progress=not args.no_progress,
    )
    seconds = time.time() - t0
    record = dict(seconds=seconds, device=str(task.device), per_nfe={})
    for nfe, res in results.items():
        res.best.info.update(
            score=res.best_score, metric=task.metric, n_search=args.n_search, model=task.name
        )
        res.best.save(args.out / f"schedule_nfe{nfe}.json")
        record["per_nfe"][str(nfe)] = dict(
            score=res.best_score,
            evaluations=res.evaluations,
            baselines=res.baselines,
            history=res.history,
            schedule=res.best.to_dict(),
        )
        log(f"search NFE {nfe}: {res.best_score:.5g} after {res.evaluations} candidates")
    record["evaluations"] = next(iter(results.values())).total_evaluations
    write_text_atomic(path, json.dumps(record, indent=1))
    return record


def stage_eval(task, args, log):
    path = args.out / "eval.json"
    if path.is_file() and not args.force:
        log(f"{path} exists; skipping the evaluation (--force to redo it)")
        return read_json(path)
    grid, found = read_json(args.out / "grid.json"), read_json(args.out / "search.json")
    if grid is None or found is None:
        raise SystemExit(f"error: run --stage grid and --stage search into {args.out} first")
    sets = {
        s: task.inputs(seed, args.n_eval) for s, seed in (("A", args.eval_seed_a), ("B", args.eval_seed_b))
    }
    scorers = {s: task.scorer(*sets[s]) for s in sets}
    rows = []
    for nfe in args.nfes:
        cands = [r for r in grid["rows"] if r["nfe"] == nfe]
        if not cands or str(nfe) not in found["per_nfe"]:
            continue
        best = min(cands, key=lambda r: r["score"])
        hand = baseline_schedule(
            task.mf.process, best["solver"], nfe, t_end=args.t_end, schedule=best["grid"]
        )
        entries = {
            "hand-picked": (
                best["config"],
                hand,
                best["dualfast"],
                best["score"],
            ),
            "searched": (
                "searched",
                SolverSchedule.from_dict(found["per_nfe"][str(nfe)]["schedule"]),
                False,
                found["per_nfe"][str(nfe)]["score"],
            ),
        }
        for kind, (name, sched, df, search_score) in entries.items():
            row = dict(nfe=nfe, kind=kind, config=name, search_score=search_score, n_eval=args.n_eval)
            for s, (x_T, cond) in sets.items():
                t0 = time.time()
                x = draw(task, sched, x_T, cond, args.batch, df)
                row[f"score_{s}"] = scorers[s](x)
                row[f"acc_{s}"] = task.accuracy(x, cond)
                row[f"seconds_{s}"] = time.time() - t0
            rows.append(row)
            log(f"eval NFE {nfe} {kind} {name}: A {row['score_A']:.5g} B {row['score_B']:.5g}")
    record = dict(rows=rows, metric=task.metric, n_eval=args.n_eval)
    write_text_atomic(path, json.dumps(record, indent=1))
    return record


def verdict(hp: dict, se: dict) -> str:
    """The decision rule of docs/search.md: beyond twice the A/A difference of the hand-picked one
    on both evaluation sets."""
    delta = abs(hp["score_A"] - hp["score_B"])
    if all(se[f"score_{s}"] < hp[f"score_{s}"] - 2 * delta for s in "AB"):
        return "searched wins"
    if all(se[f"score_{s}"] > hp[f"score_{s}"] + 2 * delta for s in "AB"):
        return "searched loses"
    return "no detectable difference"


def stage_report(task, args, log):
    ev, found, grid = (read_json(args.out / f) for f in ("eval.json", "search.json", "grid.json"))
    if ev is None or found is None or grid is None:
        raise SystemExit(f"error: run the grid, search and eval stages into {args.out} first")
    metric = ev["metric"]
    lines = [
        f"Command: `python scripts/search_gpu.py {' '.join(sys.argv[1:])}`  ",
        f"Model: {task.name}; metric {metric}; search set seed {args.search_seed} (n = {args.n_search}); "
        f"evaluation sets A (seed {args.eval_seed_a}) and B (seed {args.eval_seed_b}), "
        f"n = {ev['n_eval']} each.",
        f"Search: {found['evaluations']} candidates over NFE {','.join(map(str, args.nfes))} in "
        f"{found['seconds'] / 60:.1f} min on {found['device']}; hand-picked grid: {len(grid['rows'])} "
        f"configurations in {grid['seconds'] / 60:.1f} min.",
        "",
        "| NFE | hand-picked B* (search-set best) | B* search | B* A | B* B (A/A) | S* search | S* A | S* B "
        "| S*/B* on A | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for nfe in args.nfes:
        rows = {r["kind"]: r for r in ev["rows"] if r["nfe"] == nfe}
        if len(rows) < 2:
            continue
        hp, se = rows["hand-picked"], rows["searched"]

        def cell(r, s):
            acc = r.get(f"acc_{s}")
            return f"{r[f'score_{s}']:.4g}" + (f" ({100 * acc:.1f}%)" if acc is not None else "")

        lines.append(
            f"| {nfe} | {hp['config']} | {hp['search_score']:.4g} | {cell(hp, 'A')} | {cell(hp, 'B')} | "
            f"{se['search_score']:.4g} | {cell(se, 'A')} | {cell(se, 'B')} | "
            f"{se['score_A'] / hp['score_A']:.2f} | {verdict(hp, se)} |"
        )
    lines += ["", "Searched schedules (per NFE: t, then one strategy per step):", ""]
    for nfe in args.nfes:
        d = found["per_nfe"].get(str(nfe))
        if d is None:
            continue
        sched = SolverSchedule.from_dict(d["schedule"])
        steps = "; ".join(
            f"{float(sched.times[i]):.4g}->{float(sched.times[i + 1]):.4g} {_describe(s)}"
            for i, s in enumerate(sched.strategies)
        )
        lines.append(f"* NFE {nfe} ({d['evaluations']} candidates): {steps}")
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out / "results.md", text)
    print(text)
    return text


def _describe(s) -> str:
    parts = [s.prediction, f"p{s.order}"]
    if s.nodes is not None:
        parts.append(f"q{len(s.nodes)}")
    if s.order > 1 and s.coef != "taylor":
        parts.append(s.coef)
    if s.relax:
        parts.append(f"c={s.relax:.3g}")
    if s.corrector:
        parts.append(s.corrector)
    if s.afs is not None:
        parts.append("afs=" + ("zero" if s.afs == (0.0,) else "mean"))
    return " ".join(parts)


# ----------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", type=str, help="difftools checkpoint or run dir")
    src.add_argument("--mixture", type=str, help="vp-exact | vp-blurred | flow-exact | flow-blurred")
    src.add_argument("--smoke", action="store_true", help="tiny random DiT on CPU, small sizes")
    ap.add_argument(
        "--features", type=str, default="classifier", help="classifier | inception | <classifier dir>"
    )
    ap.add_argument("--ref-stats", type=str, default=None, help="reference statistics (.npz, Stats.save)")
    ap.add_argument("--nfes", type=str, default="4,5,6,8")
    ap.add_argument(
        "--solvers", type=str, default=",".join(sorted(SOLVERS)), help="the hand-picked grid's solvers"
    )
    ap.add_argument("--n-search", type=int, default=1000)
    ap.add_argument("--n-eval", type=int, default=10000)
    ap.add_argument("--search-seed", type=int, default=1000)
    ap.add_argument("--eval-seed-a", type=int, default=2000)
    ap.add_argument("--eval-seed-b", type=int, default=3000)
    ap.add_argument("--search-minutes", type=float, default=None, help="wall-clock budget of the search")
    ap.add_argument("--budget", type=int, default=100000, help="candidate evaluations (all NFEs)")
    ap.add_argument("--t-end", type=float, default=1e-3)
    ap.add_argument("--t-end-range", type=str, default=None, help="lo,hi: search t_end in it")
    ap.add_argument(
        "--afs-mean",
        choices=("data", "zero", "none"),
        default="data",
        help="analytical first step: data mean (pixel models), x0 = 0 only, or off",
    )
    ap.add_argument("--seed", type=int, default=0, help="search seed")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--device", type=str, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--stage", choices=("grid", "search", "eval", "report", "all"), default="all")
    ap.add_argument("--force", action="store_true", help="redo a stage whose output exists")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.nfes = [int(v) for v in args.nfes.split(",")]
    args.solvers = args.solvers.split(",")
    unknown = sorted(set(args.solvers) - set(SOLVERS))
    if unknown:
        ap.error(f"unknown solvers {unknown}; expected names from {sorted(SOLVERS)}")
    if args.smoke:
        args.nfes, args.n_search, args.n_eval, args.batch = [3, 4], 32, 48, 64
        args.solvers = ["ddim", "unipc_bh2"]
        args.budget, args.search_minutes = min(args.budget, 40), None
    if args.mixture:  # float64 vectors: one batch
        args.batch = max(args.batch, args.n_eval, args.n_search)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = SmokeTask(args) if args.smoke else (MixtureTask(args) if args.mixture else CheckpointTask(args))
    args.out.mkdir(parents=True, exist_ok=True)
    log = print
    t0 = time.time()
    stages = ("grid", "search", "eval", "report") if args.stage == "all" else (args.stage,)
    for stage in stages:
        {"grid": stage_grid, "search": stage_search, "eval": stage_eval, "report": stage_report}[stage](
            task, args, log
        )
    log(f"done in {time.time() - t0:.0f} s: {args.out}")


if __name__ == "__main__":
    from difftools.checkpoint import CheckpointError

    try:
        main()
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
