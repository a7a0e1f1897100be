"""Guidance sweep on a class-conditional DiT: CFG vs APG vs CFG-Zero*, and LML vs no LML.

For w in {1.5, 3, 5, 8} and 10 / 25 steps it samples the same noise and labels with every method
and writes to ``--out``:

* ``guidance.md`` / ``guidance.json``: per row the NFE, a Fréchet distance to the data in the
  metric classifier's feature space (``fd_<classifier>``; Inception weights are not used), the
  class accuracy of that classifier on the samples, and an oversaturation measure: mean HSV
  saturation and the pixel mean / std, each next to the data's values;
* ``grids.png``: one grid, rows = scales, column blocks = CFG | APG | CFG-Zero* (10 steps, same
  noise and labels in every block);
* LML rows at equal NFE: N steps without a corrector vs N/2 steps + 1 corrector iteration each
  (first-order Langevin and LML), all at CFG w = 3.

Full run (CUDA, DiT-T/S on CIFAR-10, about 6 minutes with n = 2000)::

    python scripts/guidance_sweep.py --ckpt runs/dit_cifar/checkpoints/latest --out out/guidance

``--smoke`` (CPU, under a minute): a tiny untrained DiT on the digits data, n = 16, pixel-space
features and no classifier, only to exercise every code path.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from samplers import ModelFn, sample
from samplers.guidance import guided

METHODS = (("cfg", {}), ("apg", {}), ("cfg_zero_star", {}))


# ------------------------------------------------------------------ statistics
def saturation_stats(x: torch.Tensor) -> dict:
    """Mean HSV saturation (RGB; 0 for grey images) and pixel mean / std of images in [-1, 1]."""
    img = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    if img.shape[1] == 3:
        mx, mn = img.max(1).values, img.min(1).values
        sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-12), torch.zeros_like(mx)).mean().item()
    else:
        sat = 0.0
    return {"saturation": sat, "pixel_mean": img.mean().item(), "pixel_std": img.std().item()}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    from difftools.metrics.fid import fd, gaussian_fit

    return fd(gaussian_fit(a), gaussian_fit(b))


class Scorer:
    """Features + class accuracy; pixel features (4x4 average-pooled) when no classifier is given."""

    def __init__(self, classifier=None):
        self.clf = classifier
        self.name = f"fd_{classifier.name}" if classifier is not None else "fd_pixels4x4"

    def features(self, x: torch.Tensor) -> np.ndarray:
        if self.clf is None:
            pooled = torch.nn.functional.adaptive_avg_pool2d(x.float().cpu(), 4)
            return pooled.flatten(1).double().numpy()
        from difftools.metrics.fid import float_to_uint8
        with torch.no_grad():
            return self.clf.extract(float_to_uint8(x).to(self.clf.device)).double().cpu().numpy()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.clf is None:
            return float("nan")
        from difftools.metrics.classifier import class_accuracy
        from difftools.metrics.fid import float_to_uint8
        return class_accuracy(self.clf, float_to_uint8(x), y.cpu())


# ------------------------------------------------------------------ model
def smoke_model(device):
    """A tiny untrained DiT on digits (16 px, grey) with a VP process: exercises the code paths."""
    from difftools.data import build_dataset
    from difftools.models.dit import DiT
    from difftools.process import VP
    torch.manual_seed(0)
    net = DiT(input_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2,
              num_classes=10).to(device).eval()
    ds = build_dataset("digits", split="train", image_size=16)
    return net, VP(), "eps", None, ds


def load_model(ckpt: str, device):
    import difftools
    from difftools.data import build_dataset
    from difftools.metrics.evaluate import dataset_of
    loaded = difftools.load(ckpt, device=device)
    name, size, _ = dataset_of(loaded)
    ds = build_dataset(name, split="train", image_size=size)
    return loaded.model.to(device).eval(), loaded.process, loaded.prediction, loaded.autoencoder, ds


def data_tensor(ds, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    return torch.stack([ds[i][0] for i in idx])


# ------------------------------------------------------------------ sweep
def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.smoke:
        net, process, prediction, ae, ds = smoke_model(device)
    else:
        net, process, prediction, ae, ds = load_model(args.ckpt, device)
    num_classes = getattr(net, "num_classes", 10)
    null = getattr(net, "null_class", num_classes)
    clf = None
    if args.features:
        from difftools.metrics.features import build_extractor
        clf = build_extractor(args.features, device=device)
    elif not args.smoke:
        from difftools.metrics.classifier import default_classifier
        clf = default_classifier(ds.info.name, ds.info.image_size, device=device)
    scorer = Scorer(clf)

    def net_fn(x, t, y=None):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return net(x, t, y=y).float()

    mf = ModelFn(net_fn, process, prediction)
    n = args.n
    latent_ch = ae.latent_channels if ae is not None else ds.info.channels
    size = ds.info.image_size // (ae.downsample if ae is not None else 1)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(n, latent_ch, size, size, generator=g).to(device)
    labels = (torch.arange(n) % num_classes).to(device)
    uncond = {"y": torch.full_like(labels, null)}

    data = data_tensor(ds, n, seed=args.seed)
    data_feats = scorer.features(data.to(device))
    data_stats = saturation_stats(data)

    def decode(z):
        return ae.decode(z).clamp(-1, 1) if ae is not None else z.clamp(-1, 1)

    def draw(model_fn, steps, **opts):
        out = []
        model_fn.reset()
        for i in range(0, n, args.batch):
            with torch.no_grad():
                z = sample(model_fn, noise[i:i + args.batch], solver=args.solver, steps=steps,
                           y=labels[i:i + args.batch], **opts)
            out.append(decode(z).float())
        return torch.cat(out), model_fn.nfe / math.ceil(n / args.batch)

    rows, grids = [], {}

    def score(name, w, steps, x, nfe, extra=""):
        row = {"method": name, "w": w, "steps": steps, "nfe": nfe, "extra": extra,
               scorer.name: frechet(scorer.features(x.to(device)), data_feats),
               "class_acc": scorer.accuracy(x, labels), **saturation_stats(x)}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    t0 = time.time()
    x, nfe = draw(mf, args.steps[0])
    score("none", 1.0, args.steps[0], x, nfe)
    for steps in args.steps:
        for kind, opts in METHODS:
            for w in args.scales:
                gm = guided(mf, kind, w, uncond, **opts)
                x, nfe = draw(gm, steps)
                score(kind, w, steps, x, nfe)
                if steps == args.steps[0]:
                    grids[(kind, w)] = x[: args.grid_cols].cpu()
    # LML vs no LML at equal NFE (CFG w = 3)
    for total in args.steps:
        half = max(total // 2, 1)
        gm = guided(mf, "cfg", 3.0, uncond)
        x, nfe = draw(gm, total)
        score("cfg", 3.0, total, x, nfe, "no corrector")
        x, nfe = draw(gm, half, lml=dict(n_steps=1, step=args.lml_step, lamb=math.inf))
        score("cfg", 3.0, half, x, nfe, f"first-order Langevin step={args.lml_step}")
        x, nfe = draw(gm, half, lml=dict(n_steps=1, step=args.lml_step, lamb=args.lml_lamb))
        score("cfg", 3.0, half, x, nfe, f"LML step={args.lml_step} lamb={args.lml_lamb}")
    elapsed = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_grid(grids, args.scales, out / "grids.png")
    protocol = {"solver": args.solver, "n": n, "seed": args.seed, "device": str(device),
                "ckpt": args.ckpt, "features": scorer.name, "data_stats": data_stats,
                "seconds": round(elapsed, 1), "smoke": args.smoke}
    (out / "guidance.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
    (out / "guidance.md").write_text(markdown(rows, protocol, scorer.name))
    print(f"wrote {out}/guidance.md, guidance.json, grids.png in {elapsed:.1f} s")
    return {"protocol": protocol, "rows": rows}


def write_grid(grids: dict, scales, path: Path) -> None:
    from PIL import Image

    from difftools.metrics.fid import float_to_uint8
    blocks = []
    for kind, _ in METHODS:
        rows = [torch.cat(list(grids[(kind, w)]), dim=-1) for w in scales]   # [C, H, cols*W]
        blocks.append(torch.cat(rows, dim=-2))
    pad = torch.ones_like(blocks[0][:, :, :4])
    img = torch.cat([torch.cat([b, pad], dim=-1) for b in blocks], dim=-1)
    arr = float_to_uint8(img).permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def markdown(rows, protocol, fd_name) -> str:
    ds = protocol["data_stats"]
    head = (f"# Guidance sweep\n\nsolver {protocol['solver']}, n = {protocol['n']} per row, "
            f"seed {protocol['seed']}, device {protocol['device']}, checkpoint {protocol['ckpt']}, "
            f"{protocol['seconds']} s.\n"
            f"Data: saturation {ds['saturation']:.4f}, pixel mean {ds['pixel_mean']:.4f}, "
            f"pixel std {ds['pixel_std']:.4f}. Grid: grids.png (rows w = scales, "
            "blocks CFG | APG | CFG-Zero*).\n\n")
    cols = ["method", "w", "steps", "nfe", fd_name, "class_acc", "saturation", "pixel_mean", "pixel_std",
            "extra"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="class-conditional DiT checkpoint directory (difftools.load)")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny untrained model on CPU, < 1 minute")
    p.add_argument("--features", help="metric classifier checkpoint (default: the cached one of the dataset)")
    p.add_argument("--n", type=int, default=None, help="samples per row (default 2000; smoke 16)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    p.add_argument("--scales", type=float, nargs="+", default=[1.5, 3.0, 5.0, 8.0])
    p.add_argument("--lml-step", type=float, default=0.1)
    p.add_argument("--lml-lamb", type=float, default=1e-3)
    p.add_argument("--grid-cols", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.n = args.n or 16
        args.steps = [2, 4] if args.steps == [10, 25] else args.steps
        torch.set_num_threads(1)
    elif not args.ckpt:
        p.error("--ckpt is required unless --smoke")
    args.n = args.n or 2000
    args.grid_cols = min(args.grid_cols, args.n)
    return run(args)


if __name__ == "__main__":
    main()
