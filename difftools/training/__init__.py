"""Training loop on accelerate: :class:`Trainer`, its :class:`TrainerConfig`, :class:`EMA`."""

from difftools.training.ema import EMA
from difftools.training.trainer import NonFiniteLossError, Trainer, TrainerConfig, TrainModule, TrainResult

__all__ = ["EMA", "NonFiniteLossError", "Trainer", "TrainerConfig", "TrainModule", "TrainResult"]
