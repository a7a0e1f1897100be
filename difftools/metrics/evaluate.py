"""Score samples of a trained run: ``fd_<classifier>`` (or FID) against the training set, KID, and the
class accuracy of class-conditional samples, with n and the sampling protocol beside each number.

* :func:`evaluate_samples` scores uint8 samples in several feature spaces (what scripts/sample.py
  reports); several processes each take the features of their share (:func:`shard_features`) and
  the main process scores the gathered features (:func:`score_features`) -- the same numbers as
  one process, which :func:`score` runs as those two steps;
* :func:`evaluate_checkpoint` (alias ``evaluate_run``) is what ``train/dit.py`` calls at the end of a
  run (``eval.enabled=true``): it loads the EMA weights, draws class-balanced samples with per-image
  seeds (:mod:`difftools.generate`) and scores them.

The reference is the training set's statistics: computed from the dataset once and cached
(:func:`~difftools.metrics.reference.reference_stats`), or read from statistics files given as
``stats_files`` (``scripts/fid.py --save-stats``), in which case the dataset's files are not needed.
The default feature space is the dataset's cached metric classifier (trained on the spot when
missing, :func:`~difftools.metrics.classifier.default_classifier`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from difftools.checkpoint import load
from difftools.generate import SampleSpec, generate_uint8
from difftools.metrics.classifier import class_accuracy, default_classifier
from difftools.metrics.distances import result
from difftools.metrics.features import ClassifierFeatures, FeatureExtractor, build_extractor, default_device
from difftools.metrics.reference import pick_reference, reference_stats
from difftools.metrics.stats import Stats, extract_features, stats_from_features


def build_features(
    features, dataset: str, image_size: int, device=None, cache=None, root=None, log=print, **inception_kw
) -> FeatureExtractor:
    """``"classifier"`` -> the dataset's cached metric classifier; otherwise :func:`build_extractor`."""
    if isinstance(features, FeatureExtractor):
        return features
    if features in (None, "classifier"):
        return default_classifier(
            dataset,
            image_size,
            root=root,
            device=device,
            log=log,
            cache=None if cache is None else Path(cache) / "classifiers",
        )
    return build_extractor(features, device=device, **inception_kw)


def reference_for(
    extractor: FeatureExtractor,
    dataset: str,
    image_size: int,
    split: str = "train",
    root: str | os.PathLike | None = None,
    stats_files: Sequence[str | os.PathLike] = (),
    cache: str | Path | None = None,
    progress: bool = False,
) -> Stats:
    """Reference statistics of ``dataset``/``split`` at ``image_size`` in ``extractor``'s feature space:
    from ``stats_files`` when given (the one made with this extractor, checked against the dataset,
    split and size; the dataset is not read), else from the dataset (:func:`reference_stats`, cached
    in ``cache``/stats)."""
    if stats_files:
        return pick_reference(stats_files, extractor, dataset, split, image_size)
    return reference_stats(dataset, extractor, split=split, image_size=image_size, root=root,
                           cache=None if cache is None else Path(cache) / "stats", progress=progress)


def shard_features(
    images: torch.Tensor, labels: torch.Tensor | None, extractor: FeatureExtractor
) -> dict:
    """What one process contributes to a score: the features of its uint8 ``images`` (float32
    [n, D], in the order given), the number of them classified as their ``labels`` (None for
    unconditional samples or non-classifier features) and the seconds it took. Several processes'
    shares, put in image order by :func:`gather_shares`, give :func:`score_features` what one process
    would (each image's features do not depend on which others share its batch, up to float
    round-off of batched kernels)."""
    t0 = time.perf_counter()
    if not len(images):  # a process with no images (fewer images than processes)
        return {"feats": np.zeros((0, extractor.dim), np.float32), "correct": None if labels is None else 0,
                "seconds": 0.0}
    feats, _ = extract_features(images, extractor)
    correct = None
    if labels is not None and isinstance(extractor, ClassifierFeatures):
        correct = round(class_accuracy(extractor, images, labels) * len(images))
    return {"feats": feats, "correct": correct, "seconds": time.perf_counter() - t0}


def images_sha256(images: torch.Tensor) -> str:
    """The sha256 of uint8 images [N, C, H, W] in order (what statistics record as their source)."""
    return hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()


def gather_shares(shares: Sequence[dict], order: Sequence[int] | None = None) -> dict:
    """The :func:`shard_features` of several processes as one: features concatenated and put in
    image order (``order``: the argsort of the concatenated image indices; None = as given), class
    counts summed (None if any is None), the slowest process's seconds."""
    feats = np.concatenate([np.asarray(s["feats"], dtype=np.float32) for s in shares if len(s["feats"])])
    if order is not None:
        feats = feats[np.asarray(order)]
    counts = [share["correct"] for share in shares]
    return {"feats": feats, "correct": None if any(c is None for c in counts) else sum(counts),
            "seconds": max(share["seconds"] for share in shares)}


def score_features(
    share: dict,
    extractor: FeatureExtractor,
    reference: Stats,
    with_kid: bool = True,
    name: str = "samples",
    source_sha256: str = "",
) -> dict:
    """:func:`score` from the features of all images in image order (one :func:`shard_features`,
    or several processes' through :func:`gather_shares`).

    Keys: ``metric`` (fid | fd_<name>), ``<metric>`` (value), ``kid``, ``n_samples``,
    ``n_reference``, ``class_accuracy`` (None for unconditional samples or non-classifier
    features), ``feature_images_per_second`` (per process), ``protocol``."""
    feats = share["feats"]
    stats = stats_from_features(feats, extractor, name, source_sha256)
    rec = result(extractor, stats, reference, with_kid, name, reference.source)
    acc = None if share["correct"] is None else share["correct"] / max(len(feats), 1)
    seconds = share["seconds"]  # with several processes, the slowest one's
    return {
        "metric": rec["metric"],
        rec["metric"]: rec["value"],
        "kid": rec["kid"],
        "n_samples": rec["n_a"],
        "n_reference": rec["n_b"],
        "class_accuracy": acc,
        "feature_images_per_second": len(feats) / max(seconds, 1e-9),
        "protocol": rec["protocol"],
    }


def score(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    extractor: FeatureExtractor,
    reference: Stats,
    with_kid: bool = True,
    name: str = "samples",
) -> dict:
    """Distance of uint8 ``images`` to ``reference`` in ``extractor``'s space, plus class accuracy
    (the keys of :func:`score_features`)."""
    share = shard_features(images, labels, extractor)
    return score_features(share, extractor, reference, with_kid, name, images_sha256(images))


def evaluate_samples(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    dataset: str,
    image_size: int,
    features: Sequence = ("classifier",),
    split: str = "train",
    root: str | os.PathLike | None = None,
    stats_files: Sequence[str | os.PathLike] = (),
    with_kid: bool = True,
    device=None,
    inception_weights: str | os.PathLike | None = None,
    allow_download: bool = False,
    cache: str | Path | None = None,
    progress: bool = False,
    name: str = "samples",
    log=print,
) -> dict[str, dict]:
    """Score uint8 ``images`` (with the ``labels`` they were drawn for) in every feature space of
    ``features`` (``"classifier"``, ``"inception"``, a classifier checkpoint directory or an
    extractor) against ``dataset``/``split`` at ``image_size`` (:func:`reference_for`): ``{metric:
    score dict}`` (:func:`score`)."""
    scores = {}
    for spec in features:
        ext = build_features(spec, dataset, image_size, device=device, cache=cache, root=root, log=log,
                             weights=inception_weights, allow_download=allow_download)
        ref = reference_for(ext, dataset, image_size, split, root, stats_files, cache, progress)
        s = score(images, labels, ext, ref, with_kid=with_kid, name=name)
        scores[s["metric"]] = s
    return scores


def evaluate_checkpoint(
    checkpoint,
    num_samples: int = 1000,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    schedule: str = "logsnr",
    guidance_scale: float = 1.0,
    guidance: str = "cfg",
    seed: int = 0,
    batch_size: int = 250,
    features="classifier",
    reference_split: str = "train",
    dataset: str | None = None,
    image_size: int | None = None,
    data_root: str | None = None,
    stats_files: Sequence[str | os.PathLike] = (),
    device=None,
    cache: str | Path | None = None,
    with_kid: bool = True,
    precision: str = "bf16",
    log=print,
    **sampler_opts,
) -> dict:
    """Sample ``num_samples`` class-balanced images from ``checkpoint`` (EMA weights) and score them
    against ``reference_split`` of the run's dataset, or against ``stats_files`` (then the dataset's
    files need not be present).

    Returns the :func:`score` dict plus ``nfe``, ``sampling`` (the :class:`SampleSpec`),
    ``sampling_seconds``, ``images_per_second``, ``reference`` and ``checkpoint``."""
    device = default_device(device)
    spec = SampleSpec(
        sampler=sampler,
        steps=steps,
        schedule=schedule,
        guidance_scale=guidance_scale,
        guidance=guidance,
        seed=seed,
        sampler_opts=sampler_opts,
        precision=precision,
    ).validate()
    run = load(checkpoint, use_ema=True, device=device)
    if dataset is None:
        dataset, size, root = run.reference_dataset()
        image_size = image_size or size
        data_root = data_root or root
    ext = build_features(features, dataset, image_size, device=device, cache=cache, root=data_root, log=log)
    t0 = time.perf_counter()
    images, labels, nfe = generate_uint8(run, range(num_samples), spec, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ref = reference_for(ext, dataset, image_size, reference_split, data_root, stats_files, cache)
    out = score(images, labels, ext, ref, with_kid)
    out.update(
        nfe=nfe,
        sampling=spec.as_dict(),
        sampling_seconds=seconds,
        images_per_second=num_samples / max(seconds, 1e-9),
        reference=f"{dataset}/{reference_split}/{image_size}px",
        checkpoint=str(run.path),
    )
    if log is not None:
        acc = out["class_accuracy"]
        log(
            f"{out['metric']} = {out[out['metric']]:.4f} (n={out['n_samples']} samples vs "
            f"{out['n_reference']} {out['reference']}; {sampler}, {steps} steps, NFE {nfe}, "
            f"guidance {guidance_scale})"
            + ("" if acc is None else f"; class accuracy {acc:.4f}")
        )
    return out


evaluate_run = evaluate_checkpoint
