"""Training loop on accelerate: :class:`Trainer`, its :class:`TrainerConfig`, :class:`EMA`; the
divergence stop (:mod:`.health`, :mod:`.vetting`) and the run-directory lock (:mod:`.lock`)."""

from difftools.training.ema import EMA
from difftools.training.health import DivergedError, NonFiniteLossError
from difftools.training.lock import RunDirLock, RunDirLockedError
from difftools.training.trainer import Trainer, TrainerConfig, TrainModule, TrainResult

__all__ = ["EMA", "DivergedError", "NonFiniteLossError", "RunDirLock", "RunDirLockedError", "Trainer",
           "TrainerConfig", "TrainModule", "TrainResult"]
