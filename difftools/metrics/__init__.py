"""Evaluation: image sets (:mod:`.images`), feature extractors (:mod:`.features`), feature statistics
and their files (:mod:`.stats`), Fréchet distance and KID (:mod:`.distances`, :func:`compare` in
:mod:`.fid`), reference statistics of a dataset (:mod:`.reference`), the metric classifier
(:mod:`.classifier`), and scoring of a trained run's samples (:mod:`.evaluate`).

Nothing is called FID unless it was computed with Inception FID weights; every other Fréchet
distance is named ``fd_<feature space>``, and every number carries n and its protocol.
"""

from difftools.metrics.distances import fd, kid
from difftools.metrics.evaluate import evaluate_checkpoint, evaluate_run, evaluate_samples
from difftools.metrics.features import (
    ClassifierFeatures,
    FeatureExtractor,
    InceptionFeatures,
    PixelFeatures,
    build_extractor,
)
from difftools.metrics.fid import compare
from difftools.metrics.reference import reference_from_file, reference_stats
from difftools.metrics.stats import Stats, StatsMismatchError, compute_stats

__all__ = [
    "ClassifierFeatures",
    "FeatureExtractor",
    "InceptionFeatures",
    "PixelFeatures",
    "Stats",
    "StatsMismatchError",
    "build_extractor",
    "compare",
    "compute_stats",
    "evaluate_checkpoint",
    "evaluate_run",
    "evaluate_samples",
    "fd",
    "kid",
    "reference_from_file",
    "reference_stats",
]
