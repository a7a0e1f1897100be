"""Held-out evaluation of a fine-tuned policy, and choosing checkpoints on it instead of on reward.

A reward model can be fooled (reward hacking); a *judge* -- a second classifier trained on other
data, never used in training -- and a Fréchet distance to real data, both on a fixed set of
held-out noise seeds, tell whether the policy got better or only learned to please the reward.

:class:`HeldOutEval` samples ``n`` class-balanced images (labels i mod classes, noise seeded by
(seed, i); the training collection uses other seeds) with the collection sampler and no guidance
(or ``cfg_scale`` for a baseline) and measures:

* ``judge_accuracy``: fraction classified as their label by the judge
  (:func:`difftools.metrics.classifier.class_accuracy`);
* ``reward_accuracy``: the same with the reward classifier, when given (its gap to the judge is the
  hacking signal);
* ``fd``: Fréchet distance of their features to the reference statistics
  (:func:`difftools.metrics.compute_stats`, :func:`difftools.metrics.fid.result`), named by the
  feature space's metric (``fd_<name>``, or ``fid`` for Inception);
* ``diversity``: mean over classes of the mean pairwise L2 distance between the features of the
  samples of that class (falls when the policy collapses onto prototypes).

:class:`BestSelection` keeps the best evaluation: the highest judge accuracy whose fd is within
``fd_tolerance`` of the base model's (None: no fd limit), or the lowest fd (``select='fd'``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from difftools.metrics import build_extractor, compute_stats
from difftools.metrics.classifier import class_accuracy
from difftools.metrics.fid import Stats, result
from difftools.rl.sampling import sample_policy, to_uint8

SELECT = ("judge_accuracy", "fd")


def class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise Euclidean distance between features of one class
    (pairs i != j; classes with fewer than 2 samples are skipped)."""
    values = []
    for c in torch.unique(labels):
        f = features[labels == c].double()
        m = f.shape[0]
        if m < 2:
            continue
        d = torch.cdist(f, f)
        values.append(float(d.sum() / (m * (m - 1))))
    if not values:
        raise ValueError("class_diversity needs at least one class with 2 or more samples")
    return sum(values) / len(values)


class HeldOutEval:
    """Judge accuracy, fd and per-class diversity of a policy on fixed held-out seeds.

    Args:
        judge: a classifier checkpoint dir (or a ``ClassifierFeatures``) never used for training.
        features: the fd feature space: ``inception``, a classifier checkpoint dir, or an extractor.
        reference: statistics of the real data in that space (a ``Stats`` or its ``.npz`` file).
        process, prediction, autoencoder: the policy's (from its base checkpoint).
        num_classes: labels are ``i mod num_classes``.
        n: images per evaluation (class-balanced).
        seed: noise seed of the held-out set (the training collection uses the run's ``seed``).
        sampler: the sampler options (:func:`difftools.rl.sampling.sample_policy`).
        reward: the reward classifier checkpoint dir (or ``ClassifierFeatures``), to report its
            accuracy on the same images; None leaves ``reward_accuracy`` out.
        batch: sampling batch.
        device: where sampling and feature extraction run.
    """

    def __init__(
        self,
        judge,
        features,
        reference,
        *,
        process,
        prediction: str,
        num_classes: int,
        n: int = 1000,
        seed: int = 1_000_000,
        sampler: Mapping,
        autoencoder=None,
        reward=None,
        batch: int = 500,
        device=None,
    ):
        if int(n) < 2:
            raise ValueError(f"eval.n must be >= 2 (a Fréchet distance needs 2 images), got {n}")
        if not num_classes:
            raise ValueError(
                "the held-out evaluation scores class-conditional samples; this model has no classes"
            )
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.judge = build_extractor(judge, device=self.device)
        if not hasattr(self.judge, "logits"):
            raise ValueError(f"eval.judge must be a classifier checkpoint directory, got {judge!r}")
        self.features = build_extractor(features, device=self.device)
        self.reward = build_extractor(reward, device=self.device) if reward is not None else None
        self.reference = reference if isinstance(reference, Stats) else Stats.load(reference)
        if self.reference.extractor and self.reference.extractor != self.features.key():
            raise ValueError(
                f"reference statistics {reference} were computed with features "
                f"{self.reference.extractor!r}, but eval.features is {self.features.key()!r}; "
                "recompute them in that feature space"
            )
        self.process, self.prediction, self.autoencoder = process, prediction, autoencoder
        self.n, self.seed, self.batch = int(n), int(seed), int(batch)
        self.num_classes, self.sampler = int(num_classes), dict(sampler)
        self.labels = torch.arange(self.n) % self.num_classes

    def images(self, model, cfg_scale: float = 1.0, autocast=None) -> torch.Tensor:
        """uint8 [n, C, H, W] of ``model`` on the held-out seeds."""
        _, images = sample_policy(
            model,
            self.process,
            self.prediction,
            self.labels,
            self.seed,
            range(self.n),
            self.sampler,
            autoencoder=self.autoencoder,
            cfg_scale=cfg_scale,
            batch=self.batch,
            device=self.device,
            autocast=autocast,
        )
        return to_uint8(images)

    def score(self, images: torch.Tensor) -> dict:
        """The metrics of uint8 images drawn for ``self.labels``."""
        feats = torch.cat(
            [self.features(images[i : i + self.batch]) for i in range(0, len(images), self.batch)]
        )
        stats = compute_stats(images, self.features)
        fd_record = result(self.features, stats, self.reference, with_kid=False, name_a="held-out samples")
        out = {
            "judge_accuracy": class_accuracy(self.judge, images, self.labels),
            "fd": fd_record["value"],
            "diversity": class_diversity(feats, self.labels),
            "n": len(images),
        }
        if self.reward is not None:
            out["reward_accuracy"] = class_accuracy(self.reward, images, self.labels)
        return out

    @property
    def metric(self) -> str:
        """The name of the fd (``fd_<features>`` or ``fid``)."""
        return self.features.metric

    def __call__(self, model, cfg_scale: float = 1.0, autocast=None) -> dict:
        was_training = model.training
        model.eval()
        try:
            return self.score(self.images(model, cfg_scale, autocast))
        finally:
            model.train(was_training)


@dataclass
class BestSelection:
    """The rule that picks the best checkpoint from held-out evaluations (never from reward).

    ``select='judge_accuracy'``: the highest judge accuracy among evaluations with
    fd <= (1 + fd_tolerance) fd_base (fd_tolerance None: any fd); ``select='fd'``: the lowest fd.
    """

    select: str = "judge_accuracy"
    fd_tolerance: float | None = 0.1

    def __post_init__(self):
        if self.select not in SELECT:
            raise ValueError(f"eval.select must be one of {SELECT}, got {self.select!r}")
        if self.fd_tolerance is not None and self.fd_tolerance < 0:
            raise ValueError(f"eval.fd_tolerance must be >= 0 or null, got {self.fd_tolerance}")

    def eligible(self, record: Mapping, fd_base: float | None) -> bool:
        if not all(math.isfinite(float(record[k])) for k in ("judge_accuracy", "fd")):
            return False
        if self.select == "fd" or self.fd_tolerance is None or fd_base is None:
            return True
        return float(record["fd"]) <= (1.0 + self.fd_tolerance) * fd_base

    def better(self, record: Mapping, best: Mapping | None, fd_base: float | None) -> bool:
        """Whether ``record`` becomes the best (ties keep the earlier one)."""
        if not self.eligible(record, fd_base):
            return False
        if best is None:
            return True
        if self.select == "fd":
            return float(record["fd"]) < float(best["fd"])
        return float(record["judge_accuracy"]) > float(best["judge_accuracy"])

    def pick(self, records: Sequence[Mapping], fd_base: float | None) -> Mapping | None:
        best = None
        for record in records:
            if self.better(record, best, fd_base):
                best = record
        return best


def frontier_fd(points: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """The fd of a baseline frontier at ``accuracy``: linear interpolation between the (accuracy, fd)
    points sorted by accuracy; None outside their accuracy range."""
    pts = sorted(points)
    for (a0, f0), (a1, f1) in zip(pts, pts[1:], strict=False):
        if a0 <= accuracy <= a1:
            return f0 if a1 == a0 else f0 + (f1 - f0) * (accuracy - a0) / (a1 - a0)
    if len(pts) == 1 and pts[0][0] == accuracy:
        return pts[0][1]
    return None


def beyond_frontier(point: tuple[float, float], frontier: Sequence[tuple[float, float]]) -> bool:
    """Whether an (accuracy, fd) point is on or beyond (better than) a baseline's accuracy-fd frontier:
    its fd is at most the frontier's at the same accuracy, or its accuracy is above every baseline
    point while its fd is at most that of the most accurate one. No point of the frontier may
    dominate it (as accurate or more with a lower fd)."""
    acc, fd_value = point
    if any(a >= acc and f < fd_value for a, f in frontier):
        return False
    at = frontier_fd(frontier, acc)
    if at is not None:
        return fd_value <= at
    top_acc, top_fd = max(frontier)
    return acc > top_acc and fd_value <= top_fd
