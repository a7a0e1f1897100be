#!/usr/bin/env python
"""Fréchet distance (and KID) between two image sets; prints one JSON line.

    python scripts/fid.py A B [--features inception|<classifier checkpoint dir>]

A and B: image folders, .npz files of uint8 images, .npz statistics written by difftools, or
``dataset:<name>[:<split>]`` (cached reference statistics of a toolkit dataset, e.g.
``dataset:cifar10:train``). With ``--features inception`` the Inception weights come from
``--weights`` or $DIFFTOOLS_FID_WEIGHTS (``--download`` allows fetching them); the metric is then
called ``fid``. With a classifier checkpoint it is ``fd_<classifier name>``.

Output keys: metric, value, kid, n_a, n_b, protocol. Bad input (a folder of mixed image sizes, an
undecodable file, fewer than 2 images) prints ``error: ...`` and exits 2; fewer images than feature
dimensions prints ``warning: ...`` (the distance is then not meaningful) on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--features", default="inception", help="inception, or a classifier checkpoint directory")
    p.add_argument("--weights", default=None, help="Inception weights file (default $DIFFTOOLS_FID_WEIGHTS)")
    p.add_argument("--mode", default=None, choices=["legacy_pytorch", "clean"])
    p.add_argument("--download", action="store_true", help="allow downloading the Inception weights")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-kid", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    from difftools.metrics.features import build_extractor
    from difftools.metrics.fid import compute_stats, describe, reference_stats, result

    ext = build_extractor(
        args.features, device=args.device, weights=args.weights, mode=args.mode, allow_download=args.download
    )

    def stats(spec: str):
        if spec.startswith("dataset:"):
            name, _, split = spec[len("dataset:") :].partition(":")
            return reference_stats(name, ext, split=split or "train", progress=args.progress), spec
        return compute_stats(spec, ext, args.batch_size, args.progress), describe(spec)

    (sa, name_a), (sb, name_b) = stats(args.a), stats(args.b)
    for s, name in ((sa, name_a), (sb, name_b)):
        if s.extractor and s.extractor != ext.key():
            raise SystemExit(
                f"{name}: statistics were computed with features {s.extractor!r}, not {ext.key()!r}"
            )
    rec = result(ext, sa, sb, not args.no_kid, name_a, name_b)
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
