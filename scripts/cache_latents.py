"""Encode a dataset once into a latent cache (sharded safetensors + meta.json) for ``data=latents``.

    python scripts/cache_latents.py --data cifar10 --image-size 64 --vae taef2 --out cache/cifar10-taef2-64
    python scripts/cache_latents.py --data mnist --image-size 32 --vae kl --vae-path runs/vae/autoencoder \\
        --out cache/mnist-kl --splits train test

Each split goes to ``<out>/<split>/``; with flips (default) every image is stored twice, as itself
and mirrored, each encoded separately. Train from it with the DiT recipe:

    python train/dit.py data=latents data.root=cache/cifar10-taef2-64 vae=taef2 ...

The cache records the autoencoder config (incl. scale/shift) and the sha256 of its weights;
training with a different autoencoder is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from difftools.data import build_dataset
from difftools.data.latents import cache_latents
from difftools.device import default_device
from difftools.models.autoencoders import build_autoencoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, help="dataset name (digits, mnist, fashion_mnist, cifar10, image_folder)"
    )
    p.add_argument("--root", default=None, help="data folder (default $DIFFTOOLS_DATA; see docs/data.md)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size before encoding")
    p.add_argument("--splits", nargs="+", default=["train"])
    p.add_argument("--vae", default="taef2", help="identity | taef2 | kl | tiny")
    p.add_argument("--vae-path", default=None, help="autoencoder weights directory")
    p.add_argument(
        "--scale", type=float, default=None, help="latent scale (default: model's, else estimated)"
    )
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--out", required=True, help="cache directory; splits go to <out>/<split>")
    p.add_argument("--no-flip", action="store_true", help="do not store horizontally flipped variants")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--limit", type=int, default=None, help="encode only the first N items (smoke runs)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = str(default_device(args.device))
    kw = {"path": args.vae_path} if args.vae_path else {}
    ae = build_autoencoder(args.vae, scale=args.scale, shift=args.shift, **kw)
    out = Path(args.out)
    report = {}
    # The first split fixes the scale (estimated on training images when the model has none);
    # later splits reuse it, so all splits share one latent space.
    for split in args.splits:
        ds = build_dataset(args.data, root=args.root, split=split, image_size=args.image_size)
        t0 = time.time()
        d = cache_latents(
            ds,
            ae,
            out / split,
            flip=not args.no_flip,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            device=device,
            dtype=args.dtype,
            limit=args.limit,
        )
        meta = json.loads((d / "meta.json").read_text())
        report[split] = {
            "dir": str(d),
            "items": meta["num_items"],
            "latent_shape": meta["latent_shape"],
            "seconds": round(time.time() - t0, 2),
        }
        logging.info(
            "%s: %d items -> %s, latent %s, %.1fs",
            split,
            meta["num_items"],
            d,
            meta["latent_shape"],
            time.time() - t0,
        )
    report["autoencoder"] = ae.config()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
