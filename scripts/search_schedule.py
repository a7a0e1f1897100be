#!/usr/bin/env python
"""Search an S³ solver schedule for a trained checkpoint at a fixed NFE (samplers.search).

    python scripts/search_schedule.py --ckpt runs/dit/<date> --nfe 5 --budget 300 --n-calib 256 \
        --score ref --out runs/search/nfe5
    python scripts/search_schedule.py --smoke --out /tmp/s3_smoke          # CPU, < 1 min, tiny random DiT

Liu et al., arXiv 2312.07243 (USF / S³). Calibration: ``--n-calib`` class-balanced samples (label i
mod num_classes) from fixed per-image noise (seed ``--seed``, as ``difftools.metrics.generate``
draws it); every candidate starts from the same noise. Score (lower is better):

* ``ref``: RMSE to a high-NFE reference solution (``--ref-solver`` with ``--ref-steps`` steps) from
  the same noise (distance to the teacher ODE solution);
* ``fd``: Fréchet distance of the candidate's decoded samples to the training set in the dataset's
  metric-classifier feature space (``fd_<classifier>``, n = n-calib; the paper uses FID of 1k samples).

Generation 0 holds DDIM, DPM-Solver++(2M/3M) and UniPC-bh2 at this NFE (logSNR grid), so the result
is never worse than them on the calibration score. Held-out evaluation (noise seed ``--heldout-seed``):
reference RMSE on ``--n-heldout`` samples and, when the dataset's metric classifier is cached or can
be trained, fd_<classifier> to the training set + class accuracy of ``--n-eval`` samples, for each
baseline, the searched schedule and the reference solver itself. Writes to ``--out``:
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftools.metrics.generate import image_noise  # noqa: E402
from samplers import ModelFn, sample  # noqa: E402
from samplers.atomic import write_text_atomic  # noqa: E402
from samplers.search import (  # noqa: E402
    BASELINES,
    ReferenceScore,
    SearchConfig,
    baseline_schedule,
    reference_score,
    search,
)


class Setup:
    """The model as a ModelFn, its sample shape, decoder, classes, and the metric's feature space."""

    def __init__(self, args):
        if args.smoke:
            from difftools.models.dit import DiT
            from difftools.process import Flow

            torch.manual_seed(0)
            net = DiT(
                input_size=8,
                in_channels=3,
                patch_size=2,
                hidden_size=32,
                depth=2,
                num_heads=2,
                num_classes=10,
            ).eval()
            with torch.no_grad():  # DiT's zero-initialised output layer would make every solver agree
                for prm in net.parameters():
                    prm.normal_(0.0, 0.1)
            self.model, self.process, self.prediction, self.decode = net, Flow(), "flow", (lambda z: z)
            self.shape, self.num_classes, self.dataset, self.image_size = (3, 8, 8), 10, None, 8
        else:
            import difftools
            from difftools.metrics.evaluate import dataset_of

            loaded = difftools.load(args.ckpt, device="cpu")
            self.model, self.process, self.prediction = loaded.model.eval(), loaded.process, loaded.prediction
            ae = loaded.autoencoder
            self.decode = (lambda z: ae.decode(z)) if ae is not None else (lambda z: z)
            self.shape = (self.model.in_channels, self.model.input_size, self.model.input_size)
            info = loaded.dataset_info or {}
            self.num_classes = int(info.get("num_classes", getattr(self.model, "num_classes", 0) or 0))
            self.dataset, self.image_size, _ = dataset_of(loaded)
            self.checkpoint = str(loaded.path)
        model = self.model
        self.mf = ModelFn(lambda x, t, **c: model(x, t, **c), self.process, self.prediction)
        self.extractor, self.ref_stats = None, None

    def inputs(self, seed: int, n: int) -> tuple[torch.Tensor, dict]:
        x_T = float(self.process.sigma(torch.tensor(1.0))) * image_noise(seed, range(n), self.shape)
        cond = {"y": torch.arange(n) % self.num_classes} if self.num_classes else {}
        return x_T, cond

    def images(self, x: torch.Tensor) -> torch.Tensor:
        from difftools.metrics.fid import float_to_uint8

        with torch.no_grad():
            return float_to_uint8(self.decode(x).float().clamp(-1, 1))

    def load_metric(self, smoke: bool, log=print) -> bool:
        """The dataset's metric classifier + training-set statistics; False when unavailable."""
        if smoke:
            proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0))
            self.extractor = lambda imgs: imgs.float().flatten(1) @ proj / 100.0
            self.metric = "fd_random_projection"
            return True
        try:
            from difftools.metrics.classifier import default_classifier
            from difftools.metrics.fid import reference_stats

            self.extractor = default_classifier(self.dataset, self.image_size, log=log)
            self.ref_stats = reference_stats(
                self.dataset, self.extractor, split="train", image_size=self.image_size
            )
            self.metric = self.extractor.metric
            return True
        except (FileNotFoundError, ValueError, OSError) as err:
            log(f"no metric classifier for {self.dataset}: {err}; reporting reference RMSE only")
            return False

    def frechet(self, images: torch.Tensor, reference_images: torch.Tensor | None = None) -> float:
        """fd to the training set (smoke: to ``reference_images``)."""
        from difftools.metrics.fid import fd, gaussian_fit

        feats = self.extractor(images).double().numpy()
        if self.ref_stats is None:
            return fd(gaussian_fit(feats), gaussian_fit(self.extractor(reference_images).double().numpy()))
        return fd(gaussian_fit(feats), self.ref_stats)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float | None:
        from difftools.metrics.classifier import class_accuracy
        from difftools.metrics.features import ClassifierFeatures

        if not self.num_classes or not isinstance(self.extractor, ClassifierFeatures):
            return None
        return class_accuracy(self.extractor, images, labels)


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
    from difftools.process import VP, Flow, as_time
    from tests.mixture import make_mixture

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


def main():
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
    args = ap.parse_args()
    if args.mixture:
        torch.set_num_threads(args.threads)
        return mixture_table(args)
    if args.smoke:
        args.budget, args.n_calib, args.n_heldout, args.n_eval, args.ref_steps = 40, 32, 32, 64, 10
        args.nfe = min(args.nfe, 4)
    elif not args.ckpt:
        ap.error("--ckpt is required (or --smoke)")
    torch.set_num_threads(args.threads)
    t_all = time.time()
    log = print
    setup = Setup(args)
    has_metric = setup.load_metric(args.smoke, log)
    if args.score == "fd" and not has_metric:
        raise SystemExit("error: --score fd needs the dataset's metric classifier")
    ref_kw = dict(ref_solver=args.ref_solver, ref_steps=args.ref_steps, t_end=args.t_end)
    mf = setup.mf

    # ---- calibration + search
    x_cal, cond_cal = setup.inputs(args.seed, args.n_calib)
    t0 = time.time()
    ref_cal = reference_score(mf, x_cal, cond_cal, **ref_kw)
    ref_images_cal = setup.images(ref_cal.reference.float()) if args.score == "fd" else None
    if args.score == "ref":
        score_fn, score_name = ref_cal, f"RMSE to {args.ref_solver} x{args.ref_steps}"
    else:

        def score_fn(x):
            return setup.frechet(setup.images(x), ref_images_cal)

        score_name = f"{setup.metric} (n={args.n_calib})"
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
        checkpoint=getattr(setup, "checkpoint", "smoke"),
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
        name: baseline_schedule(setup.process, name, args.nfe, t_end=args.t_end) for name in BASELINES
    }
    schedules["searched"] = best
    calib_scores = {**res.baselines, "searched": res.best_score}
    n_ho = max(args.n_heldout, args.n_eval if has_metric else 0)
    x_ho, cond_ho = setup.inputs(args.heldout_seed, n_ho)
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
    grid_rows = {name: setup.images(x[: max(setup.num_classes, 10)]) for name, x in samples.items()}
    grid_rows[teacher] = grid_rows.pop(teacher)  # last row
    if has_metric:
        labels = cond_ho["y"][: args.n_eval] if "y" in cond_ho else None
        ref_imgs = setup.images(samples[teacher][: args.n_eval])
        for row in rows:
            imgs = setup.images(samples[row["schedule"]][: args.n_eval])
            row.update(
                {
                    setup.metric: setup.frechet(imgs, ref_imgs),
                    "n_eval": args.n_eval,
                    "class_accuracy": setup.accuracy(imgs, labels) if labels is not None else None,
                }
            )

    # ---- outputs
    from difftools.training.grid import save_grid

    ncol = max(setup.num_classes, 1) if setup.num_classes else 10
    grid = torch.cat([imgs[:ncol] for imgs in grid_rows.values()])
    save_grid(grid.float() / 127.5 - 1, args.out / "grid.png", nrow=ncol)
    protocol = dict(
        command="python " + " ".join(sys.argv),
        checkpoint=getattr(setup, "checkpoint", "smoke (random DiT)"),
        nfe=args.nfe,
        budget=args.budget,
        evaluations=res.evaluations,
        n_calib=args.n_calib,
        calib_seed=args.seed,
        search_seed=args.search_seed,
        heldout_seed=args.heldout_seed,
        n_heldout=args.n_heldout,
        n_eval=args.n_eval if has_metric else None,
        score=score_name,
        reference=f"{args.ref_solver} with {args.ref_steps} steps (logSNR grid)",
        t_end=args.t_end,
        threads=args.threads,
        search_seconds=round(search_seconds, 1),
        seconds=round(time.time() - t_all, 1),
        metric=setup.metric if has_metric else None,
        fd_reference="the reference solver's samples (smoke)" if args.smoke else "the training set",
    )
    record = dict(protocol=protocol, rows=rows, history=res.history, schedule=best.to_dict())
    write_text_atomic(args.out / "results.json", json.dumps(record, indent=1, default=str))
    write_text_atomic(args.out / "results.md", to_markdown(protocol, rows, best, has_metric))
    print(to_markdown(protocol, rows, best, has_metric))


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
    from difftools.checkpoint import CheckpointError

    try:
        main()
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
