"""Sample quality vs NFE for DDIM, DPM-Solver++ 2M/3M and UniPC, each with and without DualFast.

    # CUDA acceptance (about 6 min on an H100 for a DiT-T/S on CIFAR-10, N = 5000):
    python scripts/sampler_quality.py --ckpt RUN/checkpoints/latest --features CLASSIFIER_DIR \
        --n 5000 --out docs/sampler_quality
    # CPU smoke (< 1 min): a tiny untrained DiT (difftools.testing), pooled-pixel features
    python scripts/sampler_quality.py --smoke --out /tmp/sq

For every solver x NFE in {4, 5, 6, 8, 10, 20} x DualFast off/on it draws N class-conditional
samples from the same per-image seeds (``difftools.generate``: image i's noise from the pair
[seed, i], so results do not depend on batch size; t = 1 to 1e-3 without a final denoising step),
decodes them (the checkpoint's autoencoder), and reports the Fréchet distance in the given feature
space to the dataset's reference statistics (``fd_<features>``, with n; ``--stats FILE`` reads them
from a ``scripts/fid.py --save-stats`` file instead of the dataset) and, for a classifier feature
extractor, the class accuracy of the samples. ``--wait S`` polls up to S seconds for the checkpoint
(``difftools.load``) and the features to appear. Writes ``sampler_quality.json``,
``sampler_quality.md`` and ``samplers_nfe.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

import difftools
from difftools.generate import SampleSpec, generate_uint8
from difftools.metrics.classifier import class_accuracy
from difftools.metrics.distances import fd
from difftools.metrics.evaluate import reference_for
from difftools.metrics.features import ClassifierFeatures, PixelFeatures, build_extractor
from difftools.metrics.stats import compute_stats
from difftools.testing import smoke_run

SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2")
NFES = (4, 5, 6, 8, 10, 20)


def wait_for(path: Path, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if time.time() > deadline:
            raise FileNotFoundError(
                f"{what} not found at {path} (waited {seconds:.0f} s); train it first or pass the right path"
            )
        time.sleep(10)


def load_run(args, device):
    if args.smoke:
        return smoke_run("flow", perturb=0.1, device=device)
    wait_for(Path(args.ckpt), args.wait, "checkpoint")
    return difftools.load(args.ckpt, device=device)


def load_metric(args, run, device):
    """(feature extractor, reference statistics of the training set)."""
    dataset, size, root = run.reference_dataset()
    if args.smoke:
        extractor = PixelFeatures(channels=run.sample_shape[0])
    else:
        if args.features != "inception":
            wait_for(Path(args.features), args.wait, "feature extractor (classifier checkpoint)")
        extractor = build_extractor(args.features, device=device)
    cache = args.out / "cache" if args.smoke else None  # smoke runs leave the user's cache alone
    return extractor, reference_for(extractor, dataset, size, "train", root, args.stats or (), cache)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=str, help="checkpoint directory (difftools.load)")
    ap.add_argument(
        "--features", type=str, default="inception", help="'inception' or a classifier checkpoint dir"
    )
    ap.add_argument("--stats", nargs="+", default=None,
                    help="statistics files (scripts/fid.py --save-stats) instead of the dataset")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nfes", type=str, default=",".join(map(str, NFES)))
    ap.add_argument("--solvers", type=str, default=",".join(SOLVERS))
    ap.add_argument("--wait", type=float, default=0.0, help="poll this long for checkpoint/features")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.batch, args.nfes, args.solvers = 64, 64, "4,8", "ddim,unipc_bh2"
    elif not args.ckpt:
        ap.error("--ckpt is required (or --smoke)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    nfes = [int(v) for v in args.nfes.split(",")]
    solvers = args.solvers.split(",")
    run = load_run(args, device)
    extractor, ref = load_metric(args, run, device)
    rows, t_all = [], time.time()
    for solver in solvers:
        for nfe in nfes:
            for df in (False, True):
                spec = SampleSpec(sampler=solver, steps=nfe, sampler_opts={"dualfast": df}, seed=args.seed,
                                  t_end=1e-3, denoise_final=False).validate()
                t0 = time.time()
                images, labels, nfe_used = generate_uint8(run, range(args.n), spec, args.batch, device)
                row = dict(
                    solver=solver,
                    nfe=nfe,
                    dualfast=df,
                    n=args.n,
                    fd=fd(compute_stats(images, extractor), ref),
                    nfe_per_batch=nfe_used,
                    seconds=round(time.time() - t0, 2),
                )
                if isinstance(extractor, ClassifierFeatures) and labels is not None:
                    row["class_accuracy"] = class_accuracy(extractor, images, labels)
                rows.append(row)
                print(json.dumps(row), flush=True)
    protocol = dict(
        checkpoint=args.ckpt or "smoke (random DiT)",
        features=args.features if not args.smoke else extractor.key(),
        metric=extractor.metric,
        n=args.n,
        seed=args.seed,
        schedule="logsnr",
        t_end=1e-3,
        guidance="none (class-conditional, scale 1)",
        reference=ref.source,
        seconds=round(time.time() - t_all, 1),
        command=" ".join(sys.argv),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler_quality.json").write_text(json.dumps(dict(protocol=protocol, rows=rows), indent=1))
    md = markdown(rows, protocol, solvers, nfes)
    (args.out / "sampler_quality.md").write_text(md)
    plot(rows, solvers, nfes, f"{extractor.metric} (n={args.n})", args.out / "samplers_nfe.png")
    print(md)


def markdown(rows: list[dict], protocol: dict, solvers: list[str], nfes: list[int]) -> str:
    md = [
        f"Command: `python {protocol['command']}`  ",
        f"Metric: {protocol['metric']}, n = {protocol['n']}; protocol: {json.dumps(protocol)}",
        "",
        "| solver | DualFast | " + " | ".join(f"NFE {v}" for v in nfes) + " |",
        "|---|---|" + "---|" * len(nfes),
    ]
    for solver in solvers:
        for df in (False, True):
            cells = []
            for v in nfes:
                r = next(r for r in rows if r["solver"] == solver and r["nfe"] == v and r["dualfast"] == df)
                cells.append(
                    f"{r['fd']:.2f}"
                    + (f" ({100 * r['class_accuracy']:.1f}%)" if "class_accuracy" in r else "")
                )
            md.append(f"| {solver} | {'on' if df else 'off'} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def plot(rows: list[dict], solvers: list[str], nfes: list[int], ylabel: str, path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for solver in solvers:
        for df in (False, True):
            ys = [
                next(r["fd"] for r in rows if r["solver"] == solver and r["nfe"] == v and r["dualfast"] == df)
                for v in nfes
            ]
            ax.plot(nfes, ys, marker="o", linestyle="--" if df else "-",
                    label=f"{solver}{' + DualFast' if df else ''}")
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
