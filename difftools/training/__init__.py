"""The training engine: :class:`Trainer` runs any :class:`Objective` (one recipe: what a step
computes from a batch) with the options of :class:`TrainerConfig`. The recipes' objectives:
:class:`DenoisingObjective` (DiT), :class:`ClassifierObjective` (the metric / guidance classifier),
:class:`AutoencoderObjective` (the VAE). Also :class:`EMA`, the divergence stop (:mod:`.health`,
:mod:`.vetting`), the run-directory lock (:mod:`.lock`) and :class:`LocalAccelerator` (a run
confined to this process, :mod:`.local`)."""

from difftools.training.autoencoder import AutoencoderObjective
from difftools.training.classification import ClassifierObjective
from difftools.training.denoising import DenoisingObjective, SampleGrid
from difftools.training.ema import EMA
from difftools.training.health import DivergedError, NonFiniteLossError
from difftools.training.local import LocalAccelerator
from difftools.training.lock import RunDirLock, RunDirLockedError
from difftools.training.objective import Objective, RunInfo
from difftools.training.trainer import Trainer, TrainerConfig, TrainResult

__all__ = ["EMA", "AutoencoderObjective", "ClassifierObjective", "DenoisingObjective", "DivergedError",
           "LocalAccelerator", "NonFiniteLossError", "Objective", "RunDirLock", "RunDirLockedError",
           "RunInfo", "SampleGrid", "Trainer", "TrainerConfig", "TrainResult"]
