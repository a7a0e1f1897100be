"""The noise processes, re-exported from :mod:`samplers.process` where they live.

``samplers`` is the bottom layer (torch only); the processes sit there so the samplers need
nothing from difftools. This module keeps ``from difftools.process import VP`` and the Hydra
targets ``difftools.process.VP`` of existing configs and checkpoints working; both names refer
to the same objects.
"""

from samplers.process import (
    EDM,
    PREDICTIONS,
    VP,
    Denoised,
    DiscreteVP,
    Flow,
    NoiseProcess,
    Prediction,
    TDistribution,
    as_time,
    broadcast_to,
    make_process,
    process_from_config,
    scalar_at,
)

__all__ = [
    "EDM",
    "PREDICTIONS",
    "VP",
    "Denoised",
    "DiscreteVP",
    "Flow",
    "NoiseProcess",
    "Prediction",
    "TDistribution",
    "as_time",
    "broadcast_to",
    "make_process",
    "process_from_config",
    "scalar_at",
]
