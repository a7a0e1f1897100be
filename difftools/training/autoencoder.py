"""The autoencoder recipe (``train/vae.py``) as an engine objective.

The engine's loader serves the images (its resumable data order, flips included); ``forward`` is
:class:`~difftools.losses.autoencoder.AutoencoderLoss` with z drawn from the engine's noise
generator, so a resumed run continues exactly. Checkpoints are ``kind: autoencoder`` with a
:class:`~difftools.models.autoencoders.trainable.TrainableAutoencoder` (``difftools.load`` rebuilds
it). Optional callbacks: ``evaluate`` (``trainer.eval_every``) logs the held-out reconstruction PSNR
as ``eval/psnr_db``; ``preview`` (``trainer.sample_every``) writes a two-row grid: held-out images
above their reconstructions.

What the recipe does after training (the PSNR it reports, the latent scale and shift,
``save_pretrained``) works on ``objective.model.net``, the bare diffusers model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from difftools import checkpoint as ckpt_io
from difftools.models.autoencoders.trainable import evaluate_psnr, reconstruct
from difftools.training.grid import save_grid
from difftools.training.objective import Objective


class AutoencoderObjective(Objective):
    """Train ``model`` (a :class:`TrainableAutoencoder`) with ``loss_fn`` on batches ``(x, label)``.

    Args:
        model: the autoencoder; ``model.net`` is the diffusers model.
        loss_fn: ``loss_fn(model, x, y, generator) -> (loss, logs)``, e.g. ``AutoencoderLoss``.
        dataset_info: the training data's ``DatasetInfo`` (recorded in checkpoints).
        eval_set: held-out images for ``evaluate`` and ``preview`` (None: both do nothing).
        eval_images: how many of them ``evaluate`` reconstructs.
        preview_images: how many ``preview`` shows.
    """

    kind = "autoencoder"

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, dataset_info=None, eval_set=None,
                 eval_images: int = 2000, preview_images: int = 8):
        super().__init__(model)
        self.loss_fn = loss_fn
        self.dataset_info = ckpt_io._plain(dataset_info) if dataset_info is not None else None
        self.eval_set, self.eval_images, self.preview_images = eval_set, int(eval_images), int(preview_images)

    def forward(self, batch, generator: torch.Generator):
        x, y = batch
        return self.loss_fn(self.model, x, y, generator)

    def evaluate(self, ema_model: nn.Module, step: int) -> dict:
        if self.eval_set is None:
            return {}
        device = next(ema_model.parameters()).device
        return {"psnr_db": evaluate_psnr(ema_model.net, self.eval_set, self.eval_images, device)}

    @torch.no_grad()
    def preview(self, ema_model: nn.Module, step: int, samples_dir: Path) -> Path | None:
        if self.eval_set is None or self.preview_images <= 0:
            return None
        n = min(self.preview_images, len(self.eval_set))
        device = next(ema_model.parameters()).device
        x = torch.stack([self.eval_set[i][0] for i in range(n)]).to(device)
        x_hat, _ = reconstruct(ema_model.net, x, sample=False)
        grid = torch.cat([x, x_hat.float().clamp(-1, 1)]).cpu()  # originals above their reconstructions
        return save_grid(grid, samples_dir / f"step_{step:07d}.png", nrow=n)

    def checkpoint_meta(self, step: int) -> dict:
        return ckpt_io.checkpoint_meta(self.model, kind=self.kind, dataset_info=self.dataset_info, step=step)
