#!/usr/bin/env python
"""Search an S³ solver schedule for a trained checkpoint at a fixed NFE (samplers.search).

    python scripts/search_schedule.py --ckpt runs/dit/<date> --nfe 5 --budget 300 --n-calib 256 \
        --score ref --out runs/search/nfe5
    python scripts/search_schedule.py --smoke --out /tmp/s3_smoke          # CPU, < 1 min, tiny random DiT

Liu et al., arXiv 2312.07243 (USF / S³). Calibration: ``--n-calib`` class-balanced samples (label i
mod num_classes) from fixed per-image noise (seed ``--seed``, as ``difftools.generate`` draws it);
every candidate starts from the same noise. Score (lower is better):

* ``ref``: RMSE to a high-NFE reference solution (``--ref-solver`` with ``--ref-steps`` steps) from
  the same noise (distance to the teacher ODE solution);
* ``fd``: Fréchet distance of the candidate's decoded samples to the training set in the dataset's
  metric-classifier feature space (``fd_<classifier>``, n = n-calib; the paper uses FID of 1k samples).

Generation 0 holds DDIM, DPM-Solver++(2M/3M) and UniPC-bh2 at this NFE (logSNR grid), so the result
is never worse than them on the calibration score. Held-out evaluation (noise seed ``--heldout-seed``):
reference RMSE on ``--n-heldout`` samples and, when the dataset's metric classifier is cached or can
be trained, fd_<classifier> to the training set + class accuracy of ``--n-eval`` samples, for each
baseline, the searched schedule and the reference solver itself (``--stats FILE``: the training set's
statistics from a ``scripts/fid.py --save-stats`` file instead of the dataset). Writes to ``--out``:
``schedule.json`` (``scripts/sample.py schedule_file=...`` or ``SolverSchedule.load``),
``results.json``, ``results.md`` and ``grid.png`` (rows: baselines, searched, reference; one class per
column). NFE = the solver's evaluations from t = 1 to ``--t-end`` (no final denoising evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.mixture, for --mixture

import difftools  # noqa: E402
from difftools.checkpoint import CheckpointError  # noqa: E402
from difftools.files import write_text_atomic  # noqa: E402
from difftools.generate import initial_noise  # noqa: E402
from difftools.metrics.classifier import class_accuracy, default_classifier  # noqa: E402
from difftools.metrics.distances import fd  # noqa: E402
from difftools.metrics.evaluate import reference_for  # noqa: E402
from difftools.metrics.features import ClassifierFeatures, PixelFeatures  # noqa: E402
from difftools.metrics.stats import compute_stats  # noqa: E402
from difftools.process import VP, Flow, as_time  # noqa: E402
from difftools.testing import smoke_run  # noqa: E402
from difftools.training.grid import save_grid  # noqa: E402
from samplers import ModelFn, sample  # noqa: E402
from samplers.search import (  # noqa: E402
    BASELINES,
    ReferenceScore,
    SearchConfig,
    baseline_schedule,
    reference_score,
    search,
)
from tests.mixture import make_mixture  # noqa: E402


def load_run(args):
    """The model as a loaded run (the smoke run: a perturbed tiny DiT, so solvers differ)."""
    return smoke_run("flow", perturb=0.1) if args.smoke else difftools.load(args.ckpt, device="cpu")


def inputs(run, seed: int, n: int) -> tuple[torch.Tensor, dict]:
    """x_T and conditioning of images 0..n-1 at ``seed`` (scripts/sample.py's images at that seed)."""
    return initial_noise(run, seed, range(n)), run.cond(run.labels(n))


class Metric:
    """Fréchet distance to the training set in one feature space, and class accuracy."""

    def __init__(self, extractor, reference):
        self.extractor, self.reference, self.name = extractor, reference, extractor.metric

    def frechet(self, images: torch.Tensor) -> float:
        return fd(compute_stats(images, self.extractor), self.reference)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | None) -> float | None:
        if labels is None or not isinstance(self.extractor, ClassifierFeatures):
            return None
        return class_accuracy(self.extractor, images, labels)


def load_metric(run, args, log=print) -> Metric | None:
    """The dataset's metric classifier (smoke: pooled pixels) and the training set's statistics; None
    when they are not available."""
    try:
        dataset, size, root = run.reference_dataset()
        if args.smoke:
            extractor = PixelFeatures(channels=run.sample_shape[0])
        else:
            extractor = default_classifier(dataset, size, root=root, log=log)
        cache = args.out / "cache" if args.smoke else None  # smoke runs leave the user's cache alone
        reference = reference_for(extractor, dataset, size, "train", root, args.stats or (), cache)
        return Metric(extractor, reference)
    except (FileNotFoundError, ValueError, OSError) as err:
        log(f"no metric for {run.name}: {err}; reporting reference RMSE only")
        return None


def run_batched(fn, x_T: torch.Tensor, cond: dict, batch: int) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(x_T), batch):
            outs.append(fn(x_T[i : i + batch], **{k: v[i : i + batch] for k, v in cond.items()}))
    return torch.cat(outs)


def draw(sched, mf, x_T: torch.Tensor, cond: dict, batch: int) -> torch.Tensor:
    """``sched.sample`` in batches (the samples do not depend on the batch size)."""
    return run_batched(lambda x, **c: sched.sample(mf, x, **c), x_T, cond, batch)


def mixture_table(args) -> None:
    """The harness of tests/test_search.py (4-D, 4-component Gaussian mixture, exact and "blurred"
    denoisers, VP and Flow): RMSE to the exact ODE solution (scipy DOP853) on held-out noise."""

    def blurred(mix, process, blur=0.05):
        # posterior mean at sigma_eff^2 = sigma^2 + (blur alpha)^2: a model error growing toward t = 0
        def net(x_t, t, y=None):
            t64 = as_time(t).to(torch.float64)
            alpha, sigma = process.alpha(t64), process.sigma(t64)
            return mix.posterior_mean(x_t, alpha, torch.sqrt(sigma**2 + (blur * alpha) ** 2)).to(x_t.dtype)

        return ModelFn(net, process, "x0")

    def rmse(a, b):
        return ((a - b) ** 2).mean().sqrt().item()

    nfes = [int(v) for v in args.nfes.split(",")]
    rows, t0 = [], time.time()
    mix = make_mixture(dim=4, num_components=4, std=0.3, radius=1.5)
    for pname, process in (("vp", VP()), ("flow", Flow())):
        g = torch.Generator().manual_seed(args.seed)
        x_cal = torch.randn(args.n_calib, 4, generator=g, dtype=torch.float64)
        x_ho = torch.randn(args.n_heldout, 4, generator=g, dtype=torch.float64)
        truth = mix.ode_reference(process, x_ho, 1.0, args.t_end, rtol=1e-10, atol=1e-10)
        for model in ("exact", "blurred"):
            mf = mix.model_fn(process) if model == "exact" else blurred(mix, process)
            score = reference_score(mf, x_cal, ref_solver=args.ref_solver, ref_steps=200, t_end=args.t_end)
            for nfe in nfes:
                res = search(
                    mf,
                    x_cal,
                    score,
                    nfe,
                    t_end=args.t_end,
                    budget=args.budget,
                    seed=args.search_seed,
                    progress=False,
                )
                row = dict(process=pname, model=model, nfe=nfe)
                for b in BASELINES:
                    row[b] = rmse(
                        baseline_schedule(process, b, nfe, t_end=args.t_end).sample(mf, x_ho), truth
                    )
                row["searched"] = rmse(res.best.sample(mf, x_ho), truth)
                row["calib_best_baseline"], row["calib_searched"] = (
                    min(res.baselines.values()),
                    res.best_score,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(sys.argv)
    write_text_atomic(args.out / "mixture.json", json.dumps(dict(command=cmd, rows=rows), indent=1))
    md = [
        f"Command: `{cmd}` ({time.time() - t0:.0f} s). RMSE of x(t_end) to the exact ODE solution on "
        f"n = {args.n_heldout} held-out noises; search: budget {args.budget}, n_calib = {args.n_calib}, "
        f"score = RMSE to {args.ref_solver} x200 of the same model (for `blurred`: not the exact solution).",
        "",
        "| process | denoiser | NFE | " + " | ".join(BASELINES) + " | searched | searched / best |",
        "|---|---|---|" + "---|" * (len(BASELINES) + 2),
    ]
    for r in rows:
        best = min(r[b] for b in BASELINES)
        cells = [r["process"], r["model"], str(r["nfe"])] + [f"{r[b]:.4f}" for b in (*BASELINES, "searched")]
        md.append("| " + " | ".join(cells) + f" | {r['searched'] / best:.2f} |")
    write_text_atomic(args.out / "mixture.md", "\n".join(md) + "\n")
    print("\n".join(md))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=str, help="difftools checkpoint or run dir (difftools.load)")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budget", type=int, default=300, help="candidate evaluations (baselines included)")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--score", choices=("ref", "fd"), default="ref")
    ap.add_argument("--ref-solver", type=str, default="unipc_bh2")
    ap.add_argument("--ref-steps", type=int, default=50)
    ap.add_argument("--t-end", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="calibration noise seed")
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--heldout-seed", type=int, default=1)
    ap.add_argument("--n-heldout", type=int, default=256, help="held-out samples for the reference RMSE")
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out samples for fd + class accuracy")
    ap.add_argument("--stats", nargs="+", default=None,
                    help="statistics files (scripts/fid.py --save-stats) instead of the dataset")
    ap.add_argument("--no-implicit", action="store_true", help="leave implicit correctors out of the space")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny random DiT, small sizes (CPU, < 1 min)")
    ap.add_argument(
        "--mixture", action="store_true", help="the Gaussian-mixture table instead of a checkpoint"
    )
    ap.add_argument("--nfes", type=str, default="4,5,6", help="with --mixture")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.smoke:
        args.budget, args.n_calib, args.n_heldout, args.n_eval, args.ref_steps = 40, 32, 32, 64, 10
        args.nfe = min(args.nfe, 4)
    elif not args.ckpt and not args.mixture:
        ap.error("--ckpt is required (or --smoke, or --mixture)")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mixture:
        return mixture_table(args)
    t_all = time.time()
    log = print
    run = load_run(args)
    metric = load_metric(run, args, log)
    if args.score == "fd" and metric is None:
        raise SystemExit("error: --score fd needs the dataset's metric classifier")
    ref_kw = dict(ref_solver=args.ref_solver, ref_steps=args.ref_steps, t_end=args.t_end)
    mf = run.model_fn()
    checkpoint = str(run.path) if run.path is not None else "smoke (random DiT)"

    # ---- calibration + search
    x_cal, cond_cal = inputs(run, args.seed, args.n_calib)
    t0 = time.time()
    ref_cal = reference_score(mf, x_cal, cond_cal, **ref_kw)
    if args.score == "ref":
        score_fn, score_name = ref_cal, f"RMSE to {args.ref_solver} x{args.ref_steps}"
    else:

        def score_fn(x):
            return metric.frechet(run.decode_uint8(x))

        score_name = f"{metric.name} (n={args.n_calib})"
    cfg = SearchConfig(budget=args.budget, allow_implicit=not args.no_implicit)
    res = search(
        mf,
        x_cal,
        score_fn,
        args.nfe,
        cond=cond_cal,
        t_end=args.t_end,
        config=cfg,
        seed=args.search_seed,
        progress=not args.no_progress,
    )
    search_seconds = time.time() - t0
    best = res.best
    best.info.update(
        checkpoint=checkpoint,
        score=res.best_score,
        score_name=score_name,
        n_calib=args.n_calib,
        budget=args.budget,
        seed=args.seed,
        search_seed=args.search_seed,
        command=" ".join(sys.argv),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    best.save(args.out / "schedule.json")
    log(
        f"searched schedule (NFE {best.nfe}) -> {args.out / 'schedule.json'}; {args.nfe} NFE, "
        f"calib score {res.best_score:.5g} vs baselines {res.baselines}"
    )

    # ---- held-out evaluation: one set of held-out noise; RMSE on its first n_heldout, fd + accuracy on
    # its first n_eval (image i of seed heldout_seed is scripts/sample.py's image i at seed=heldout_seed)
    schedules = {
        name: baseline_schedule(run.process, name, args.nfe, t_end=args.t_end) for name in BASELINES
    }
    schedules["searched"] = best
    calib_scores = {**res.baselines, "searched": res.best_score}
    n_ho = max(args.n_heldout, args.n_eval if metric else 0)
    x_ho, cond_ho = inputs(run, args.heldout_seed, n_ho)
    teacher = f"{args.ref_solver} x{args.ref_steps} (reference)"
    samples = {
        teacher: run_batched(
            lambda x, **c: sample(mf, x, args.ref_solver, steps=args.ref_steps, t_end=args.t_end, **c),
            x_ho,
            cond_ho,
            args.batch,
        )
    }
    ref_ho = ReferenceScore(samples[teacher][: args.n_heldout])
    rows = []
    for name, sched in schedules.items():
        samples[name] = draw(sched, mf, x_ho, cond_ho, args.batch)
        rows.append(
            dict(
                schedule=name,
                nfe=sched.nfe,
                calib_score=calib_scores[name],
                heldout_rmse=ref_ho(samples[name][: args.n_heldout]),
            )
        )
    rows.append(dict(schedule=teacher, nfe=args.ref_steps, calib_score=None, heldout_rmse=0.0))
    ncol = run.num_classes or 10
    grid_rows = {name: run.decode_uint8(x[:ncol]) for name, x in samples.items()}
    grid_rows[teacher] = grid_rows.pop(teacher)  # last row
    if metric:
        labels = cond_ho["y"][: args.n_eval] if "y" in cond_ho else None
        for row in rows:
            imgs = run.decode_uint8(samples[row["schedule"]][: args.n_eval])
            row.update(
                {
                    metric.name: metric.frechet(imgs),
                    "n_eval": args.n_eval,
                    "class_accuracy": metric.accuracy(imgs, labels),
                }
            )

    # ---- outputs
    grid = torch.cat([imgs[:ncol] for imgs in grid_rows.values()])
    save_grid(grid.float() / 127.5 - 1, args.out / "grid.png", nrow=ncol)
    protocol = dict(
        command="python " + " ".join(sys.argv),
        checkpoint=checkpoint,
        nfe=args.nfe,
        budget=args.budget,
        evaluations=res.evaluations,
        n_calib=args.n_calib,
        calib_seed=args.seed,
        search_seed=args.search_seed,
        heldout_seed=args.heldout_seed,
        n_heldout=args.n_heldout,
        n_eval=args.n_eval if metric else None,
        score=score_name,
        reference=f"{args.ref_solver} with {args.ref_steps} steps (logSNR grid)",
        t_end=args.t_end,
        threads=args.threads,
        search_seconds=round(search_seconds, 1),
        seconds=round(time.time() - t_all, 1),
        metric=metric.name if metric else None,
        fd_reference=metric.reference.source if metric else None,
    )
    record = dict(protocol=protocol, rows=rows, history=res.history, schedule=best.to_dict())
    write_text_atomic(args.out / "results.json", json.dumps(record, indent=1, default=str))
    write_text_atomic(args.out / "results.md", to_markdown(protocol, rows, best, metric is not None))
    print(to_markdown(protocol, rows, best, metric is not None))


def to_markdown(protocol: dict, rows: list[dict], best, has_metric: bool) -> str:
    metric = protocol["metric"]
    lines = [
        f"Command: `{protocol['command']}`  ",
        f"Checkpoint: {protocol['checkpoint']}; NFE {protocol['nfe']}; search score: {protocol['score']} on "
        f"n_calib = {protocol['n_calib']} (seed {protocol['calib_seed']}); "
        f"{protocol['evaluations']} candidates in {protocol['search_seconds']} s "
        f"({protocol['threads']} thread(s)); held-out noise seed {protocol['heldout_seed']}: "
        f"RMSE to the reference ({protocol['reference']}) on n = {protocol['n_heldout']}"
        + (
            f", {metric} to {protocol['fd_reference']} and class accuracy on n = {protocol['n_eval']}"
            if has_metric
            else ""
        )
        + ".",
        "",
        "| schedule | NFE | calib score | held-out RMSE |"
        + (f" {metric} | class acc |" if has_metric else ""),
        "|---|---|---|---|" + ("---|---|" if has_metric else ""),
    ]
    for r in rows:
        cells = [
            r["schedule"],
            str(r["nfe"]),
            "-" if r["calib_score"] is None else f"{r['calib_score']:.4f}",
            f"{r['heldout_rmse']:.4f}",
        ]
        if has_metric:
            acc = r.get("class_accuracy")
            cells += [f"{r[metric]:.3f}", "-" if acc is None else f"{100 * acc:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Searched schedule (t, then one strategy per step):",
        "",
        "| step | t_s -> t_t | prediction | order | coef | corrector |",
        "|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(best.strategies):
        lines.append(
            f"| {i} | {float(best.times[i]):.4f} -> {float(best.times[i + 1]):.4f} | {s.prediction} | "
            f"{s.order} | {s.coef} | {s.corrector or '-'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
