"""Guidance sweep on a class-conditional DiT: CFG vs APG vs CFG-Zero*, and LML vs no LML.

For w in {1.5, 3, 5, 8} and 10 / 25 steps it samples the same noise and labels with every method
(``difftools.generate``: per-image seeds, t = 1 to 1e-3 without a final denoising step) and writes to
``--out``:

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

``--smoke`` (CPU, under a minute): a tiny random DiT shaped like the digits data
(``difftools.testing``), n = 16, pooled-pixel features (``fd_pixels4x4``) and no classifier, only to
exercise every code path.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image

import difftools
from difftools.data import build_dataset
from difftools.generate import SampleSpec, generate_uint8
from difftools.images import float_to_uint8, uint8_to_float
from difftools.metrics.classifier import class_accuracy
from difftools.metrics.distances import fd
from difftools.metrics.evaluate import build_features
from difftools.metrics.features import ClassifierFeatures, PixelFeatures
from difftools.metrics.stats import compute_stats
from difftools.testing import smoke_run
from samplers.atomic import write_text_atomic

METHODS = (("cfg", {}), ("apg", {}), ("cfg_zero_star", {}))


def saturation_stats(x: torch.Tensor) -> dict:
    """Mean HSV saturation (RGB; 0 for grey images) and pixel mean / std of images in [-1, 1]."""
    img = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    if img.shape[1] == 3:
        mx, mn = img.max(1).values, img.min(1).values
        sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-12), torch.zeros_like(mx)).mean().item()
    else:
        sat = 0.0
    return {"saturation": sat, "pixel_mean": img.mean().item(), "pixel_std": img.std().item()}


def data_images(ds, n: int, seed: int = 0) -> torch.Tensor:
    """n training images (a seeded random subset) as uint8."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return float_to_uint8(torch.stack([ds[i][0] for i in idx]))


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loaded = smoke_run("vp", device=device) if args.smoke else difftools.load(args.ckpt, device=device)
    dataset, size, root = loaded.reference_dataset()
    n = args.n
    data = data_images(build_dataset(dataset, root=root, split=args.data_split, image_size=size), n,
                       seed=args.seed)
    if args.smoke and not args.features:
        extractor = PixelFeatures(channels=data.shape[1])
    else:
        extractor = build_features(args.features or "classifier", dataset, size, device=device, root=root)
    data_feats = compute_stats(data, extractor)

    def draw(steps: int, kind: str = "cfg", w: float = 1.0, **opts):
        spec = SampleSpec(sampler=args.solver, steps=steps, guidance=kind, guidance_scale=w,
                          sampler_opts=opts, seed=args.seed, t_end=1e-3, denoise_final=False).validate()
        return generate_uint8(loaded, range(n), spec, args.batch, device)

    rows, grids = [], {}
    out = Path(args.out)
    protocol = {"solver": args.solver, "n": n, "seed": args.seed, "device": str(device),
                "ckpt": args.ckpt, "features": extractor.metric, "data_split": args.data_split,
                "data_stats": saturation_stats(uint8_to_float(data)), "seconds": 0.0, "smoke": args.smoke}

    def score(name, w, steps, drawn, extra=""):
        images, labels, nfe = drawn
        acc = (class_accuracy(extractor, images, labels)
               if isinstance(extractor, ClassifierFeatures) and labels is not None else float("nan"))
        row = {"method": name, "w": w, "steps": steps, "nfe": nfe, "extra": extra,
               extractor.metric: fd(compute_stats(images, extractor), data_feats),
               "class_acc": acc, **saturation_stats(uint8_to_float(images))}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        protocol["seconds"] = round(time.time() - t0, 1)
        write_tables(out, rows, protocol, extractor.metric)  # every row, so a stopped run keeps its rows
        return images

    t0 = time.time()
    score("none", 1.0, args.steps[0], draw(args.steps[0]))
    for steps in args.steps:
        for kind, opts in METHODS:
            for w in args.scales:
                images = score(kind, w, steps, draw(steps, kind, w, **opts))
                if steps == args.steps[0]:
                    grids[(kind, w)] = uint8_to_float(images[: args.grid_cols])
    # LML vs no LML at equal NFE (CFG w = 3)
    for total in args.steps:
        half = max(total // 2, 1)
        score("cfg", 3.0, total, draw(total, "cfg", 3.0), "no corrector")
        lml = dict(n_steps=1, step=args.lml_step, lamb=math.inf)
        score("cfg", 3.0, half, draw(half, "cfg", 3.0, lml=lml), f"first-order Langevin step={args.lml_step}")
        lml = dict(n_steps=1, step=args.lml_step, lamb=args.lml_lamb)
        extra = f"LML step={args.lml_step} lamb={args.lml_lamb}"
        score("cfg", 3.0, half, draw(half, "cfg", 3.0, lml=lml), extra)
    elapsed = time.time() - t0

    write_grid(grids, args.scales, out / "grids.png")
    protocol["seconds"] = round(elapsed, 1)
    write_tables(out, rows, protocol, extractor.metric)
    print(f"wrote {out}/guidance.md, guidance.json, grids.png in {elapsed:.1f} s")
    return {"protocol": protocol, "rows": rows}


def write_tables(out: Path, rows: list[dict], protocol: dict, fd_name: str) -> None:
    """``guidance.json`` and ``guidance.md`` of the rows so far (atomic writes)."""
    write_text_atomic(out / "guidance.json", json.dumps({"protocol": protocol, "rows": rows}, indent=1))
    write_text_atomic(out / "guidance.md", markdown(rows, protocol, fd_name))


def write_grid(grids: dict, scales, path: Path) -> None:
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
            f"Data ({protocol.get('data_split', 'train')} split): saturation {ds['saturation']:.4f}, "
            f"pixel mean {ds['pixel_mean']:.4f}, pixel std {ds['pixel_std']:.4f}. "
            "Grid: grids.png (rows w = scales, blocks CFG | APG | CFG-Zero*).\n\n")
    cols = ["method", "w", "steps", "nfe", fd_name, "class_acc", "saturation", "pixel_mean", "pixel_std",
            "extra"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="class-conditional DiT checkpoint directory (difftools.load)")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny untrained model on CPU, < 1 minute")
    p.add_argument("--features", help="metric classifier checkpoint (default: the cached one of the dataset)")
    p.add_argument("--data-split", default="train",
                   help="split of the real images the samples are scored against (test: CIFAR-10's 9 MB "
                        "test split travels to a GPU beside the model, the 46 MB train split does not)")
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
    return args


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
