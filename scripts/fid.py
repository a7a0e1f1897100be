#!/usr/bin/env python
"""Fréchet distance (and KID) between two image sets, or the statistics of one; prints one JSON line.

    python scripts/fid.py A B [--features inception|<classifier checkpoint dir>]
    python scripts/fid.py dataset:cifar10:train --features CLASSIFIER --save-stats cifar10_train.npz

A and B: image folders, .npz files of uint8 images, .npz statistics written by difftools, or
``dataset:<name>[:<split>]`` (reference statistics of a toolkit dataset, cached; ``--image-size``
and ``--data-root`` choose its size and files). With ``--features inception`` the Inception weights
come from ``--weights`` or $DIFFTOOLS_FID_WEIGHTS (``--download`` allows fetching them); the metric is
then called ``fid``. With a classifier checkpoint it is ``fd_<classifier name>``.

``--save-stats OUT`` writes A's statistics (mean, covariance, n and the protocol: feature space and
its weights' sha256, resize path, dataset / split / image size) to OUT; that file then stands in for
the dataset in every evaluation (``scripts/sample.py metrics.stats_files=[OUT]``,
``difftools.metrics.evaluate_checkpoint(..., stats_files=[OUT])``), so the dataset need not be
present. It holds mean and covariance only (about 2 MB for 512 features) unless ``--kid-features N``
keeps N feature rows for KID.

Output keys: metric, value, kid, n_a, n_b, protocol (and saved_stats); with A alone: saved_stats, n,
features, dataset, kid_features, bytes. Bad input (a folder of mixed image sizes, an undecodable file,
fewer than 2 images, statistics of another feature space) prints ``error: ...`` and exits 2; fewer
images than feature dimensions prints ``warning: ...`` (the distance is then not meaningful) on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from difftools.metrics.distances import result
from difftools.metrics.features import FeatureExtractor, build_extractor
from difftools.metrics.images import describe
from difftools.metrics.reference import reference_stats
from difftools.metrics.stats import Stats, compute_stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b", nargs="?", default=None, help="the second set (optional with --save-stats)")
    p.add_argument("--features", default="inception", help="inception, or a classifier checkpoint directory")
    p.add_argument("--weights", default=None, help="Inception weights file (default $DIFFTOOLS_FID_WEIGHTS)")
    p.add_argument("--mode", default=None, choices=["legacy_pytorch", "clean"])
    p.add_argument("--download", action="store_true", help="allow downloading the Inception weights")
    p.add_argument("--image-size", type=int, default=None, help="dataset:... sources at this size")
    p.add_argument("--data-root", default=None, help="dataset:... sources read from this folder")
    p.add_argument("--save-stats", type=Path, default=None, help="write A's statistics to this .npz file")
    p.add_argument("--kid-features", type=int, default=0, help="feature rows kept in --save-stats (for KID)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-kid", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.b is None and args.save_stats is None:
        p.error("give two image sets A B, or one with --save-stats OUT")
    return args


def source_stats(spec: str, ext: FeatureExtractor, args) -> tuple[Stats, str]:
    """Statistics of one command-line source and its name."""
    if spec.startswith("dataset:"):
        name, _, split = spec[len("dataset:") :].partition(":")
        stats = reference_stats(name, ext, split=split or "train", image_size=args.image_size,
                                root=args.data_root, progress=args.progress)
        return stats, spec
    return compute_stats(spec, ext, args.batch_size, args.progress), describe(spec)


def save_stats(stats: Stats, path: Path, kid_features: int) -> dict:
    """Write ``stats`` (with at most ``kid_features`` feature rows) and describe the file."""
    keep = stats.feats[:kid_features] if kid_features > 0 and stats.feats is not None else None
    kept = Stats(**{**vars(stats), "feats": keep})
    kept.save(path, features=keep is not None)
    return {"saved_stats": str(path), "n": stats.n, "features": stats.extractor, "dataset": stats.dataset,
            "kid_features": 0 if keep is None else len(keep), "bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ext = build_extractor(
        args.features, device=args.device, weights=args.weights, mode=args.mode, allow_download=args.download
    )
    sa, name_a = source_stats(args.a, ext, args)
    saved = save_stats(sa, args.save_stats, args.kid_features) if args.save_stats else None
    if args.b is None:
        rec = saved
    else:
        sb, name_b = source_stats(args.b, ext, args)
        rec = result(ext, sa, sb, not args.no_kid, name_a, name_b)
        if saved:
            rec["saved_stats"] = saved["saved_stats"]
    print(json.dumps(rec))
    return rec


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    warnings.showwarning = _print_warning  # one plain line, not the library's source location
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as err:  # bad input: the message names it; no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
