"""Sample quality vs NFE for DDIM, DPM-Solver++ 2M/3M and UniPC, each with and without DualFast.

    # CUDA acceptance (about 6 min on an H100 for a DiT-T/S on CIFAR-10, N = 5000):
    python scripts/sampler_quality.py --ckpt RUN/checkpoints/latest --features CLASSIFIER_DIR \
        --n 5000 --out docs/sampler_quality
    # CPU smoke (< 1 min): a tiny untrained DiT, random-projection features
    python scripts/sampler_quality.py --smoke --out /tmp/sq

For every solver x NFE in {4, 5, 6, 8, 10, 20} x DualFast off/on it draws N class-conditional
samples from the same per-image seeds (image i's noise from the pair [seed, i], as
``difftools.metrics.generate.image_noise`` draws it, so results do not depend on batch size),
decodes them (the checkpoint's autoencoder), and reports the Fréchet distance in the given feature
space to the dataset's reference statistics (``fd_<features>``, with n) and, for a classifier
feature extractor, the class accuracy of the samples. ``--wait S`` polls up to S seconds
for the checkpoint (``difftools.load``) and the features to appear. Writes
``sampler_quality.json``, ``sampler_quality.md`` and ``samplers_nfe.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftools.metrics.fid import float_to_uint8  # noqa: E402
from difftools.metrics.generate import image_noise  # noqa: E402
from samplers import ModelFn, sample  # noqa: E402

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


def load_setup(args, device):
    """(model_fn, latent shape, decode, num_classes, dataset name, image_size)."""
    if args.smoke:
        from difftools.models.dit import DiT
        from difftools.process import Flow

        torch.manual_seed(0)
        net = (
            DiT(
                input_size=8,
                in_channels=3,
                patch_size=2,
                hidden_size=32,
                depth=2,
                num_heads=2,
                num_classes=10,
            )
            .to(device)
            .eval()
        )
        return ModelFn(net, Flow(), "flow"), (3, 8, 8), (lambda z: z), 10, None, 8
    import difftools
    from difftools.metrics.evaluate import dataset_of

    wait_for(Path(args.ckpt), args.wait, "checkpoint")
    loaded = difftools.load(args.ckpt, device=device)
    model = loaded.model.eval()
    info = loaded.dataset_info or {}
    name, size, _ = dataset_of(loaded)
    ae = loaded.autoencoder
    shape = (
        model.in_channels if hasattr(model, "in_channels") else ae.latent_channels,
        model.input_size if hasattr(model, "input_size") else size,
        model.input_size if hasattr(model, "input_size") else size,
    )
    decode = (lambda z: ae.decode(z)) if ae is not None else (lambda z: z)
    return (
        ModelFn(model, loaded.process, loaded.prediction),
        shape,
        decode,
        int(info.get("num_classes", getattr(model, "num_classes", 10))),
        name,
        size,
    )


def build_features(args, device, name, size):
    """(extractor callable uint8 -> features, reference Stats or None, class-accuracy fn or None)."""
    if args.smoke:
        proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0))
        return (lambda imgs: imgs.float().flatten(1) @ proj / 100.0), None, None
    from difftools.metrics import build_extractor, reference_stats
    from difftools.metrics.classifier import class_accuracy
    from difftools.metrics.features import ClassifierFeatures

    if args.features != "inception":
        wait_for(Path(args.features), args.wait, "feature extractor (classifier checkpoint)")
    extractor = build_extractor(args.features, device=device)
    ref = reference_stats(name, extractor, split="train", image_size=size)
    acc = (
        (lambda imgs, y: class_accuracy(extractor, imgs, y))
        if isinstance(extractor, ClassifierFeatures)
        else None
    )
    return extractor, ref, acc


def frechet(feats: torch.Tensor, ref) -> float:
    from difftools.metrics.fid import fd, gaussian_fit

    f = feats.double().numpy()
    if ref is None:  # smoke: distance between the two halves (still a real Fréchet computation)
        h = len(f) // 2
        return fd(gaussian_fit(f[h:]), gaussian_fit(f[:h]))
    return fd(gaussian_fit(f), ref)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=str, help="checkpoint directory (difftools.load)")
    ap.add_argument(
        "--features", type=str, default="inception", help="'inception' or a classifier checkpoint dir"
    )
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nfes", type=str, default=",".join(map(str, NFES)))
    ap.add_argument("--solvers", type=str, default=",".join(SOLVERS))
    ap.add_argument("--wait", type=float, default=0.0, help="poll this long for checkpoint/features")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.smoke:
        args.n, args.batch, args.nfes, args.solvers = 64, 64, "4,8", "ddim,unipc_bh2"
    elif not args.ckpt:
        ap.error("--ckpt is required (or --smoke)")
    nfes = [int(v) for v in args.nfes.split(",")]
    solvers = args.solvers.split(",")
    mf, shape, decode, num_classes, name, size = load_setup(args, device)
    extractor, ref, acc_fn = build_features(args, device, name, size)
    noise = image_noise(args.seed, range(args.n), shape)
    labels = torch.arange(args.n) % num_classes
    rows, t_all = [], time.time()
    for solver in solvers:
        for nfe in nfes:
            for df in (False, True):
                t0, feats, imgs_all = time.time(), [], []
                mf.reset()
                for i in range(0, args.n, args.batch):
                    z = noise[i : i + args.batch].to(device)
                    y = labels[i : i + args.batch].to(device)
                    with (
                        torch.no_grad(),
                        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
                    ):
                        x = sample(mf, z, solver, steps=nfe, dualfast=df, y=y)
                        img = float_to_uint8(decode(x)).cpu()
                    imgs_all.append(img)
                    feats.append(extractor(img))
                imgs = torch.cat(imgs_all)
                row = dict(
                    solver=solver,
                    nfe=nfe,
                    dualfast=df,
                    n=args.n,
                    fd=frechet(torch.cat(feats), ref),
                    nfe_per_batch=mf.nfe // max(1, -(-args.n // args.batch)),
                    seconds=round(time.time() - t0, 2),
                )
                if acc_fn is not None:
                    row["class_accuracy"] = acc_fn(imgs, labels)
                rows.append(row)
                print(json.dumps(row), flush=True)
    metric = getattr(extractor, "metric", "fd_random_projection")
    protocol = dict(
        checkpoint=args.ckpt,
        features=args.features,
        metric=metric,
        n=args.n,
        seed=args.seed,
        schedule="logsnr",
        t_end=1e-3,
        guidance="none (class-conditional, scale 1)",
        reference="train split" if ref is not None else "smoke: half vs half",
        seconds=round(time.time() - t_all, 1),
        command=" ".join(sys.argv),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler_quality.json").write_text(json.dumps(dict(protocol=protocol, rows=rows), indent=1))
    md = [
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Metric: {metric}, n = {args.n}; protocol: {json.dumps(protocol)}",
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
    (args.out / "sampler_quality.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for solver in solvers:
        for df in (False, True):
            ys = [
                next(r["fd"] for r in rows if r["solver"] == solver and r["nfe"] == v and r["dualfast"] == df)
                for v in nfes
            ]
            ax.plot(
                nfes,
                ys,
                marker="o",
                linestyle="--" if df else "-",
                label=f"{solver}{' + DualFast' if df else ''}",
            )
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"{metric} (n={args.n})")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "samplers_nfe.png", dpi=120)
    print("\n".join(md))


if __name__ == "__main__":
    main()
