"""Evaluation: FID / fd_<features> and KID (:mod:`.fid`), feature extractors (:mod:`.features`),
the metric classifier (:mod:`.classifier`), and sampling + scoring of a trained run (:mod:`.evaluate`).

Nothing is called FID unless it was computed with Inception FID weights; every other Fréchet
distance is named ``fd_<feature space>``, and every number carries n and its protocol.
"""

from difftools.metrics.evaluate import evaluate_run
from difftools.metrics.features import (
    ClassifierFeatures,
    FeatureExtractor,
    InceptionFeatures,
    build_extractor,
)
from difftools.metrics.fid import Stats, compare, compute_stats, fd, kid, reference_stats

__all__ = [
    "ClassifierFeatures",
    "FeatureExtractor",
    "InceptionFeatures",
    "Stats",
    "build_extractor",
    "compare",
    "compute_stats",
    "evaluate_run",
    "fd",
    "kid",
    "reference_stats",
]
