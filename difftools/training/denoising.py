"""The DiT recipe as an objective: a denoising loss (optionally with SRA² alignment) on images or
cached latents, with sample-grid previews.

    x0 = E(x) (frozen autoencoder; skipped for cached latents),   loss, logs = loss_fn(model, x0, y, g)

``loss_fn`` is any :mod:`difftools.losses` module (``DenoisingLoss``, ``AlignedLoss``): it receives
the model at call time, so its own parameters (the alignment projector) are trained with the model
and saved in ``state/objective.safetensors``, never exported.

With a ``DenoisingLoss`` (bare or inside ``AlignedLoss``) every process draws t and eps for the whole
global batch and keeps its rows (``global_batch_noise``), so sample j of global batch k is noised
alike on 1 or N processes: a run's losses do not depend on the number of processes, up to the order
of float sums (DDP averages per-process gradients), and a checkpoint resumes on any number of them.
The DiT's label dropout draws from the global RNG (seed + rank), so with ``class_dropout_prob > 0``
which labels are dropped still depends on the number of processes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from difftools import checkpoint as ckpt_io
from difftools.losses import DenoisingLoss
from difftools.losses.alignment import AlignedLoss
from difftools.training.grid import sample_images, save_grid
from difftools.training.objective import Objective, RunInfo

log = logging.getLogger("difftools.train")

#: images the latent scale is estimated on (the same first items on every process)
SCALE_FIT_ITEMS = 256


@dataclass
class SampleGrid:
    """How the preview grids are drawn (``trainer.sample_*``): ``num`` samples with ``solver`` in
    ``steps`` steps from noise seeded with ``seed``, classifier-free guidance ``cfg_scale``."""

    num: int = 100
    solver: str = "ddim"
    steps: int = 50
    cfg_scale: float = 1.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> SampleGrid:
        """From a :class:`TrainerConfig` (its ``sample_*`` fields and ``seed``)."""
        return cls(num=cfg.sample_num, solver=cfg.sample_solver, steps=cfg.sample_steps,
                   cfg_scale=cfg.sample_cfg_scale, seed=cfg.seed)


class DenoisingObjective(Objective):
    """Train ``model`` with ``loss_fn(model, x0, y, generator) -> (loss, logs)`` on ``(x, y)`` batches.

    Args:
        model: the denoiser (a DiT, possibly inside ``EDMPrecond``).
        loss_fn: the loss module (see the module docstring).
        process, prediction: recorded in checkpoints; used for the grids.
        autoencoder: frozen; inputs are encoded with it unless the dataset holds cached latents
            (``dataset_info.name`` starts with ``latents``). Its latent scale, when not set, is
            estimated on the first training images of a fresh run and read back from the
            checkpoint's config.yaml on resume.
        dataset_info: the dataset's ``info`` (recorded in checkpoints).
        grid: how previews are drawn (None: from the trainer config's ``sample_*`` options).

    Example::

        objective = DenoisingObjective(dit, DenoisingLoss(Flow(), "flow"), Flow(), "flow",
                                       dataset_info=dataset.info)
        Trainer(objective, TrainerConfig(max_steps=1000), "runs/dit", dataset=dataset).train()
    """

    kind = "dit"

    def __init__(self, model: nn.Module, loss_fn: nn.Module, process, prediction: str, *, autoencoder=None,
                 dataset_info=None, grid: SampleGrid | None = None):
        super().__init__(model)
        self.loss_fn = loss_fn
        self.process, self.prediction = process, prediction
        self.register_frozen("autoencoder", autoencoder)
        self.dataset_info = ckpt_io._plain(dataset_info) if dataset_info is not None else None
        # cached latents (data=latents) are already encoded
        self.encode_inputs = not str(getattr(dataset_info, "name", "")).startswith("latents")
        self.grid = grid
        self._noise_drawers = _noise_drawers(loss_fn)
        self.global_batch_noise = self._noise_drawers is not None

    def forward(self, batch, generator):
        x0, y = batch
        if self.autoencoder is not None and self.encode_inputs:
            # data preparation: the frozen encoder runs in fp32 whatever the training precision
            with torch.autocast(x0.device.type, enabled=False):
                x0 = self.autoencoder.encode(x0)
        return self.loss_fn(self.model, x0, y, generator=generator)

    def on_start(self, run: RunInfo, resumed_from: Path | None) -> None:
        for loss in self._noise_drawers or ():
            loss.hold_rows(run.rank, run.world_size)
        if self.grid is None:
            self.grid = SampleGrid.from_config(run.config)
        ae = self.autoencoder
        if ae is None:
            return
        if resumed_from is not None:  # the latent scale the run was trained with, as config.yaml records it
            config = ckpt_io.load_config(resumed_from)
            saved = ckpt_io.checkpoint_node(config, resumed_from / ckpt_io.CONFIG_FILE)["autoencoder"] or {}
            if saved.get("scale") is not None:
                ae.scale, ae.shift = saved["scale"], saved.get("shift")
        elif ae.scale is None and self.encode_inputs:
            dataset = run.dataset
            if dataset is None:
                raise ValueError(f"the {ae.name} autoencoder has no latent scale and the Trainer got no "
                                 "dataset to estimate it on: set the autoencoder's scale or pass dataset=")
            n = min(len(dataset), SCALE_FIT_ITEMS)
            ae.fit_scale(torch.stack([dataset[i][0] for i in range(n)]).to(run.device))

    def checkpoint_meta(self, step: int) -> dict:
        return ckpt_io.checkpoint_meta(self.model, kind=self.kind, process=self.process,
                                       prediction=self.prediction, autoencoder=self.autoencoder,
                                       dataset_info=self.dataset_info, step=step)

    def preview(self, ema_model: nn.Module, step: int, samples_dir: Path) -> Path:
        g = self.grid
        images = sample_images(ema_model, self.process, self.prediction, self.autoencoder, num_samples=g.num,
                               solver=g.solver, steps=g.steps, cfg_scale=g.cfg_scale, seed=g.seed)
        nrow = getattr(self.model, "num_classes", 0) or int(math.sqrt(g.num))
        path = save_grid(images, Path(samples_dir) / f"step_{step:07d}.png", nrow=nrow)
        log.info("step %d: sample grid %s", step, path)
        return path


def _noise_drawers(loss_fn: nn.Module) -> list[DenoisingLoss] | None:
    """The DenoisingLoss modules that draw every random number of ``loss_fn``, or None for a loss
    that may draw numbers of its own (then each process keeps its own noise generator)."""
    if isinstance(loss_fn, DenoisingLoss):
        return [loss_fn]
    if isinstance(loss_fn, AlignedLoss) and isinstance(loss_fn.denoise, DenoisingLoss):
        return [loss_fn.denoise]  # the alignment term draws nothing
    return None
