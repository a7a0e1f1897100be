"""Convert checkpoints between facebookresearch/DiT, SiT, diffusers and difftools.

Into a difftools checkpoint directory (``difftools.load(OUT)`` reads it):

    python scripts/convert.py --from dit --weights DiT-XL-2-256x256.pt --config DiT-XL/2 --image-size 256 \\
        --out ckpt/dit-xl-2-256 [--vae PATH_TO_sd-vae-ft-ema] [--drop-sigma]
    python scripts/convert.py --from sit --weights SiT-XL-2-256x256.pt --config SiT-XL/2 --out ckpt/sit-xl-2
    python scripts/convert.py --from diffusers --weights PIPELINE_OR_TRANSFORMER_DIR --out ckpt/from-diffusers

Out of one, as a diffusers ``DiTTransformer2DModel`` (``OUT/transformer``) + scheduler (``OUT/scheduler``):

    python scripts/convert.py --to diffusers --checkpoint ckpt/dit --out exported/ [--transformer-only]

``--config`` is a JSON / YAML file of the reference constructor's arguments or a model name
(DiT-XL/2, SiT-B/4, ...; ``--image-size`` sets its latent size = image size / 8). The conventions
(time, prediction, null class, learned sigma) are in docs/interop.md. A weights file that does not
match the config is refused with every missing, unexpected and mis-shaped key named.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftools.checkpoint import CheckpointError  # noqa: E402
from difftools.interop import ConversionError  # noqa: E402

SOURCES = ("dit", "sit", "diffusers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--from", dest="source", choices=SOURCES, help="convert a checkpoint of this kind to difftools"
    )
    p.add_argument("--to", dest="target", choices=("diffusers",), help="export a difftools checkpoint")
    p.add_argument("--weights", help="--from: the weights file (.pt/.pth/.safetensors) or diffusers folder")
    p.add_argument(
        "--config", help="--from dit/sit: constructor arguments (.json/.yaml) or a name like DiT-XL/2"
    )
    p.add_argument("--checkpoint", help="--to: the difftools checkpoint (or run) directory to export")
    p.add_argument("--out", required=True, help="output directory (must be new or empty; see --overwrite)")
    p.add_argument(
        "--image-size", type=int, help="--config NAME: image size in pixels (latent size = size / 8)"
    )
    p.add_argument("--num-classes", type=int, help="--config NAME: number of classes (default 1000)")
    p.add_argument(
        "--drop-sigma",
        action="store_true",
        help="drop the learned-sigma output channels instead of keeping them unused",
    )
    p.add_argument(
        "--weights-key", help="entry of a training checkpoint dict to read (default: ema, then model)"
    )
    p.add_argument(
        "--sit-prediction",
        default="velocity",
        choices=("velocity", "noise"),
        help="what the SiT model predicts (SiT's --prediction)",
    )
    p.add_argument(
        "--scheduler",
        help="--from diffusers: scheduler_config.json or its folder, when not in <weights>/scheduler",
    )
    p.add_argument(
        "--vae",
        help="--from dit/sit: diffusers AutoencoderKL folder to record (DiT used sd-vae-ft-ema "
        "/ -mse with latent scale 0.18215)",
    )
    p.add_argument(
        "--vae-scale", type=float, default=0.18215, help="latent scale of --vae (DiT and SiT: 0.18215)"
    )
    p.add_argument(
        "--transformer-only",
        action="store_true",
        help="--to diffusers: write the network without a scheduler config",
    )
    p.add_argument(
        "--approximate-time-embedding",
        action="store_true",
        help="--to diffusers: export a DiT whose time-embedding frequencies differ from diffusers' "
        "(facebookresearch/DiT's); outputs then differ slightly",
    )
    p.add_argument(
        "--max-shard-size", help="write weights larger than this as shards (e.g. 5GB; default 10GB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output in --out")
    args = p.parse_args(argv)
    if (args.source is None) == (args.target is None):
        p.error("give exactly one of --from {dit,sit,diffusers} or --to diffusers")
    if args.source and not args.weights:
        p.error(f"--from {args.source} needs --weights")
    if args.source in ("dit", "sit") and not args.config:
        p.error(f"--from {args.source} needs --config (a .json/.yaml file or a name such as DiT-XL/2)")
    if args.target and not args.checkpoint:
        p.error("--to diffusers needs --checkpoint (a difftools checkpoint directory)")
    return args


def run(args: argparse.Namespace) -> Path:
    if args.target == "diffusers":
        from difftools.interop import diffusers

        return diffusers.export(
            args.checkpoint,
            args.out,
            transformer_only=args.transformer_only,
            approximate_time_embedding=args.approximate_time_embedding,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size or "10GB",
        )
    autoencoder = None
    if args.vae:
        from difftools.models.vae import build_autoencoder

        autoencoder = build_autoencoder("kl", path=args.vae, scale=args.vae_scale)
    common = dict(
        drop_sigma=args.drop_sigma,
        autoencoder=autoencoder,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    if args.source == "diffusers":
        from difftools.interop import diffusers

        return diffusers.convert(args.weights, args.out, scheduler=args.scheduler, **common)
    input_size = None if args.image_size is None else args.image_size // 8
    if args.source == "dit":
        from difftools.interop import dit

        return dit.convert(
            args.weights,
            args.config,
            args.out,
            weights_key=args.weights_key,
            input_size=input_size,
            num_classes=args.num_classes,
            **common,
        )
    from difftools.interop import sit

    return sit.convert(
        args.weights,
        args.config,
        args.out,
        prediction=args.sit_prediction,
        weights_key=args.weights_key,
        input_size=input_size,
        num_classes=args.num_classes,
        **common,
    )


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = run(args)
    except (ConversionError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    print(out)
    return out


if __name__ == "__main__":
    main()
