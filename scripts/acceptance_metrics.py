#!/usr/bin/env python
"""GPU acceptance of sampling + evaluation: 10k samples of a CIFAR-10 DiT at 10, 20 and 50 steps,
each scored by ``fd_<classifier>`` (Fréchet distance in the CIFAR-10 metric classifier's features,
vs the 50k training images), KID and class accuracy; sampling and feature images/s.

    python scripts/acceptance_metrics.py --ckpt <cifar10 DiT run or checkpoint> --out results/metrics_h100
    python scripts/acceptance_metrics.py --smoke --out /tmp/metrics_smoke        # CPU, < 1 min

Steps (full run, one H100, budget ~6 min): (1) the CIFAR-10 metric classifier: loaded from the
cache, else trained (~1 min, > 80 % test accuracy; its accuracy is in the results); (2) reference
statistics of the train split (cached) and, as the real-data floor, the same distance for the 10k
test images; (3) per step count: sample (bf16, per-image seeds), score. With ``--inception-weights``
(or $DIFFTOOLS_FID_WEIGHTS) FID is added. Writes results.json, results.md and grid_<steps>.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difftools.checkpoint import load
from difftools.data import build_dataset
from difftools.generate import SampleSpec, generate_uint8
from difftools.metrics.classifier import class_accuracy, dataset_tensors, default_classifier
from difftools.metrics.distances import result
from difftools.metrics.evaluate import score
from difftools.metrics.features import ClassifierFeatures, InceptionFeatures
from difftools.metrics.reference import reference_stats
from difftools.testing import save_smoke_checkpoint
from difftools.training.grid import save_grid


def timed(fn, *args, **kw):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = fn(*args, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="CIFAR-10 DiT checkpoint / run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path (< 1 min)")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument(
        "--classifier", default=None, help="classifier checkpoint (default: cached, trained if missing)"
    )
    p.add_argument("--inception-weights", default=None, help="also report FID with this weights file")
    p.add_argument(
        "--cache", default=None, help="cache root (default $DIFFTOOLS_CACHE or ~/.cache/difftools)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.num_samples, args.steps, args.batch_size = 60, [2, 4], 30
        args.cache = args.cache or str(Path(args.out) / "cache")
    elif not args.ckpt:
        p.error("--ckpt is required (or --smoke)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.smoke:
        args.ckpt = str(save_smoke_checkpoint(out / "smoke_ckpt"))  # a random digits DiT
    cache = Path(args.cache) if args.cache else None
    t_start = time.perf_counter()
    loaded = load(args.ckpt, use_ema=True, device=device)
    dataset, size, root = loaded.reference_dataset()
    rec: dict = {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "dataset": dataset,
        "image_size": size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "num_samples": args.num_samples,
        "runs": [],
    }

    # (1) the metric classifier
    if args.classifier:
        ext, clf_seconds = timed(ClassifierFeatures.from_checkpoint, args.classifier, device=device)
    else:
        ext, clf_seconds = timed(
            default_classifier,
            dataset,
            size,
            root=root,
            device=device,
            cache=None if cache is None else cache / "classifiers",
        )
    test = build_dataset(dataset, root=root, split="test", image_size=size)
    x_test, y_test = dataset_tensors(test)
    rec["classifier"] = {
        "name": ext.name,
        "path": ext.path,
        "sha256": ext.sha256,
        "seconds_load_or_train": clf_seconds,
        "test_accuracy": class_accuracy(ext, x_test, y_test),
        "n_test": len(x_test),
    }
    print(json.dumps({"classifier": rec["classifier"]}), flush=True)

    # (2) reference statistics + the real-data floor
    extractors = [ext]
    if args.inception_weights:
        extractors.append(InceptionFeatures(args.inception_weights, device=device))
    refs = {}
    for e in extractors:
        ref, sec = timed(
            reference_stats,
            dataset,
            e,
            split="train",
            image_size=size,
            root=root,
            cache=None if cache is None else cache / "stats",
            refresh=True,
        )
        refs[e.metric] = ref
        floor = score(x_test, y_test, e, ref)
        rec.setdefault("reference", {})[e.metric] = {
            "n": ref.n,
            "seconds": sec,
            "feature_images_per_second": ref.n / sec,
            "sha256": ref.source_sha256,
            "test_split_floor": {
                "value": floor[e.metric],
                "kid": floor["kid"],
                "n_samples": floor["n_samples"],
            },
        }
    print(json.dumps({"reference": rec["reference"]}), flush=True)

    def report() -> list[str]:
        """Write results.json and results.md for the step counts finished so far."""
        rec["total_seconds"] = time.perf_counter() - t_start
        rec["protocol"] = {
            e.metric: result(e, refs[e.metric], refs[e.metric])["protocol"] for e in extractors
        }
        (out / "results.json").write_text(json.dumps(rec, indent=2, default=str))
        m0 = ext.metric
        lines = [
            f"# Sampling + metrics acceptance ({rec['device']})",
            "",
            f"Checkpoint `{rec['checkpoint']}` (step {rec['step']}); {dataset} {size}px; "
            "reference: train split "
            f"(n={refs[m0].n}). Metric classifier `{ext.name}`: test accuracy "
            f"{rec['classifier']['test_accuracy']:.4f} (n={len(x_test)}), {clf_seconds:.1f} s to load/train. "
            f"Real-data floor ({m0}, {len(x_test)} test images vs train): "
            f"{rec['reference'][m0]['test_split_floor']['value']:.4f}. Classifier feature throughput on the "
            f"train split: {rec['reference'][m0]['feature_images_per_second']:.0f} images/s.",
            "",
            f"| sampler | steps | NFE | n | {m0} | KID | class acc. | sampling img/s | feature img/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rec["runs"]:
            m = r["metrics"][m0]
            lines.append(
                f"| {args.sampler} (w={args.guidance_scale}) | {r['steps']} | {r['nfe']} | "
                f"{m['n_samples']} | "
                f"{m[m0]:.4f} | {m['kid']:.5f} | {m['class_accuracy']:.4f} | "
                f"{r['sampling_images_per_second']:.0f} | {m['feature_images_per_second']:.0f} |"
            )
        lines += [
            "",
            f"Total {rec['total_seconds']:.0f} s. Command: `python scripts/acceptance_metrics.py "
            f"--ckpt {args.ckpt} --out {args.out}" + (" --smoke" if args.smoke else "") + "`",
        ]
        (out / "results.md").write_text("\n".join(lines) + "\n")
        return lines

    # (3) sample and score per step count
    for steps in args.steps:
        spec = SampleSpec(
            sampler=args.sampler, steps=steps, guidance_scale=args.guidance_scale, seed=0
        ).validate()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        images, labels, nfe = generate_uint8(loaded, range(args.num_samples), spec, args.batch_size, device)
        seconds = time.perf_counter() - t0
        save_grid(images[:100].float() / 127.5 - 1, out / f"grid_{steps}.png", nrow=10)
        run = {
            "sampler": spec.as_dict(),
            "steps": steps,
            "nfe": nfe,
            "sampling_seconds": seconds,
            "sampling_images_per_second": args.num_samples / seconds,
            "metrics": {},
        }
        for e in extractors:
            s = score(images, labels, e, refs[e.metric])
            run["metrics"][e.metric] = {
                k: s[k]
                for k in (
                    e.metric,
                    "kid",
                    "n_samples",
                    "n_reference",
                    "class_accuracy",
                    "feature_images_per_second",
                )
            }
        rec["runs"].append(run)
        print(json.dumps(run), flush=True)
        # Rewritten after every step count, so a run stopped by a time limit keeps what it finished.
        lines = report()
    print("\n".join(lines))
    return rec


if __name__ == "__main__":
    main()
