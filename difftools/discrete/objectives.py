"""The discrete recipes as objectives of the training engine (:mod:`difftools.training`).

Data: every recipe here draws its own batches (random crops of a text, or a toy chain) from a
``batch_fn(batch_size, generator) -> x0 [B, L]``. Micro-batch k of process ``rank`` uses a CPU
generator seeded by (seed, k, rank) (:func:`batch_generator`) for the data AND the noise of that
batch, so batch k is a pure function of (seed, k, rank): a resumed run draws exactly what the
uninterrupted run drew, on any number of processes, with nothing to save. Noise is drawn on the
CPU and moved to the device (the same numbers on CPU and GPU).

Checkpoints are the engine's (``step_XXXXXXX/``, :class:`~difftools.training.Trainer`) with kind
``masked_lm`` (this module, :mod:`.distill`) or ``char_lm`` (:mod:`.judge`); the network is a
:class:`~difftools.models.token_transformer.TokenTransformer`, which ``difftools.load`` rebuilds once
``difftools.discrete`` is imported (:func:`load_token_model`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch

from difftools import checkpoint as ckpt_io
from difftools.discrete.masked import MaskedDiffusion
from difftools.models.token_transformer import TokenTransformer
from difftools.training import Objective, RunInfo, TrainerConfig

BatchFn = Callable[[int, torch.Generator], torch.Tensor]


def batch_generator(seed: int, k: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of micro-batch ``k`` on process ``rank`` (a pure function of the three)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + k) * 4099 + rank)


def trainer_config(**options) -> TrainerConfig:
    """A :class:`TrainerConfig` with the discrete recipes' defaults (those of the loop they replace:
    AdamW without weight decay, linear warmup then a constant lr, clip 1, no EMA, checkpoints at
    ``ckpt_every``), overridden by ``options``."""
    defaults = dict(lr_decay="constant", weight_decay=0.0, ema_decay=0.0, grad_clip=1.0, sample_every=0,
                    keep_last=2, tensorboard=False, progress=False, log_every=50)
    defaults.update(options)
    return TrainerConfig(**defaults)


def load_token_model(path, use_ema: bool = True, device="cpu"):
    """The :class:`~difftools.models.token_transformer.TokenTransformer` of a checkpoint (or run)
    directory, in eval mode, and its loaded record (``difftools.checkpoint.Loaded``)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        raise ckpt_io.CheckpointError(
            f"{path} is a state file of the discrete loop that existed before the training engine; these are "
            "not read any more. Runs now write checkpoints/step_XXXXXXX/: train again with train/mcd.py "
            "stage=teacher (or stage=judge) and pass its run directory")
    loaded = ckpt_io.load(path, use_ema=use_ema, device=device)
    kind = loaded.config["checkpoint"]["kind"]
    if kind not in ("masked_lm", "char_lm") or not isinstance(loaded.model, TokenTransformer):
        raise ckpt_io.CheckpointError(f"{loaded.path}: kind {kind!r} is not a discrete model (masked_lm or "
                                      "char_lm); pass a checkpoint of train/mcd.py")
    return loaded.model, loaded


class OwnBatches(Objective):
    """Base of the discrete objectives: ``batches`` yields micro-batch indices k = start, start + 1, ...
    and :meth:`draw` turns one into (x0, generator) on the CPU."""

    kind = "masked_lm"

    def __init__(self, model, batch_fn: BatchFn, seed: int, dataset_info: dict | None = None):
        super().__init__(model)
        self.batch_fn, self.seed = batch_fn, seed
        self.dataset_info = dataset_info
        self.rank, self.per_device_batch = 0, None

    def on_start(self, run: RunInfo, resumed_from: Path | None) -> None:
        self.rank, self.per_device_batch = run.rank, run.per_device_batch

    def batches(self, start: int, run: RunInfo):
        return itertools.count(start)

    def draw(self, k: int) -> tuple[torch.Tensor, torch.Generator]:
        """Micro-batch k: x0 from ``batch_fn`` and the generator of its noise, both on the model's
        device. On the CPU the noise continues the data's generator; on a GPU it comes from a GPU
        generator seeded the same way (the CPU would otherwise draw every mask and Gumbel vector)."""
        gen = batch_generator(self.seed, int(k), self.rank)
        x0 = self.batch_fn(self.per_device_batch, gen)
        device = self.device
        if device.type != "cpu":
            gen = torch.Generator(device=device).manual_seed(gen.initial_seed())
        return x0.to(device), gen

    def checkpoint_meta(self, step: int) -> dict:
        return ckpt_io.checkpoint_meta(self.model, kind=self.kind, dataset_info=self.dataset_info, step=step)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class MaskedLMObjective(OwnBatches):
    """MDLM training (the teacher, and the extra-training control): the NELBO of
    :meth:`MaskedDiffusion.loss` on the batch. ``val_fn(generator) -> x0`` (optional) gives the
    fixed held-out batches of :meth:`evaluate` (``val_batches`` of them, seeded 0..n-1)."""

    def __init__(self, model, process: MaskedDiffusion, batch_fn: BatchFn, seed: int = 0,
                 val_fn: Callable[[torch.Generator], torch.Tensor] | None = None, val_batches: int = 8,
                 dataset_info: dict | None = None):
        super().__init__(model, batch_fn, seed, dataset_info)
        self.process, self.val_fn, self.val_batches = process, val_fn, val_batches

    def forward(self, k, generator):
        x0, gen = self.draw(k)
        t, z_t = self.process.corrupt(x0, gen)
        return self.process.loss(self.model(z_t), x0, z_t, t), {}

    @torch.no_grad()
    def evaluate(self, ema_model, step: int) -> dict:
        """``val_nelbo``: the NELBO (nats/token) on ``val_batches`` fixed held-out batches."""
        if self.val_fn is None:
            return {}
        total = 0.0
        for i in range(self.val_batches):
            gen = torch.Generator().manual_seed(i)
            total += self.process.training_loss(ema_model, self.val_fn(gen), gen).item()
        return {"val_nelbo": total / self.val_batches}
