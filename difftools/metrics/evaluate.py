"""Score samples of a trained run: ``fd_<classifier>`` (or FID) against the training set, KID, and the
class accuracy of class-conditional samples, with n and the sampling protocol beside each number.

``evaluate_checkpoint(ckpt)`` (alias ``evaluate_run``) is what ``train/dit.py`` calls at the end of
a run (``eval.enabled=true``): it loads the EMA weights, draws class-balanced samples with
per-image seeds (:mod:`difftools.metrics.generate`), and scores them in the feature space of the
dataset's cached metric classifier (trained on the spot when missing, :func:`default_classifier`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from difftools.checkpoint import load
from difftools.metrics.classifier import class_accuracy, default_classifier
from difftools.metrics.features import ClassifierFeatures, FeatureExtractor, build_extractor, default_device
from difftools.metrics.fid import Stats, compute_stats, reference_stats, result
from difftools.metrics.generate import SampleSpec, generate_uint8


def dataset_of(loaded) -> tuple[str, int, dict]:
    """(dataset name, image size, data config) a checkpoint was trained on."""
    info = loaded.dataset_info or {}
    data_cfg = dict(loaded.config.get("data") or {})
    name = info.get("name") or data_cfg.get("name")
    size = info.get("image_size") or data_cfg.get("image_size")
    if name and name.startswith("latents:"):  # cached latents of <source>: compare decoded images to it
        name, size = name.split(":", 1)[1], int(size) * int(getattr(loaded.autoencoder, "downsample", 1))
    if not name or name in ("latents", "image_folder") and not data_cfg.get("root"):
        raise ValueError(
            f"{loaded.path}: cannot tell which image dataset to compare against (dataset "
            f"{name!r}); pass dataset=<name> (and image_size=) explicitly"
        )
    return name, int(size), data_cfg


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


def score(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    extractor: FeatureExtractor,
    reference: Stats,
    with_kid: bool = True,
    name: str = "samples",
) -> dict:
    """Distance of uint8 ``images`` to ``reference`` in ``extractor``'s space, plus class accuracy.

    Keys: ``metric`` (fid | fd_<name>), ``<metric>`` (value), ``kid``, ``n_samples``,
    ``n_reference``, ``class_accuracy`` (None for unconditional samples or non-classifier
    features), ``feature_images_per_second``, ``protocol``."""
    t0 = time.perf_counter()
    stats = compute_stats(images, extractor)
    seconds = time.perf_counter() - t0
    rec = result(extractor, stats, reference, with_kid, name, reference.source)
    acc = None
    if labels is not None and isinstance(extractor, ClassifierFeatures):
        acc = class_accuracy(extractor, images, labels)
    return {
        "metric": rec["metric"],
        rec["metric"]: rec["value"],
        "kid": rec["kid"],
        "n_samples": rec["n_a"],
        "n_reference": rec["n_b"],
        "class_accuracy": acc,
        "feature_images_per_second": len(images) / max(seconds, 1e-9),
        "protocol": rec["protocol"],
    }


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
    device=None,
    cache: str | Path | None = None,
    with_kid: bool = True,
    precision: str = "bf16",
    log=print,
    **sampler_opts,
) -> dict:
    """Sample ``num_samples`` class-balanced images from ``checkpoint`` (EMA weights) and score them.

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
    loaded = load(checkpoint, use_ema=True, device=device)
    if dataset is None:
        dataset, size, data_cfg = dataset_of(loaded)
        image_size = image_size or size
        data_root = data_root or data_cfg.get("root")
    ext = build_features(features, dataset, image_size, device=device, cache=cache, root=data_root, log=log)
    t0 = time.perf_counter()
    images, labels, nfe = generate_uint8(loaded, range(num_samples), spec, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ref = reference_stats(
        dataset,
        ext,
        split=reference_split,
        image_size=image_size,
        root=data_root,
        cache=None if cache is None else Path(cache) / "stats",
    )
    out = score(images, labels, ext, ref, with_kid)
    out.update(
        nfe=nfe,
        sampling=spec.as_dict(),
        sampling_seconds=seconds,
        images_per_second=num_samples / max(seconds, 1e-9),
        reference=f"{dataset}/{reference_split}/{image_size}px",
        checkpoint=str(loaded.path),
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
