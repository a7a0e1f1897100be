"""The classifier recipe as an engine objective: images held as one uint8 tensor on the device,
batches of indices from a per-epoch permutation, the loss of
:class:`~difftools.losses.classification.ClassificationLoss`.

One CPU generator, seeded ``seed``, draws everything in the order the recipe always had: at the start
of epoch e the permutation ``randperm(N)``, then per batch the loss's flip bits, shifts, t and eps.
The engine's own noise generator is not used. The generator and the current epoch's permutation
are saved with every checkpoint (``extra_state``), so a run resumed in mid-epoch continues with the
same batches and augmentations as the uninterrupted run.

``difftools.metrics.classifier.fit_classifier`` builds this objective and its SGD-Nesterov,
one-cycle :class:`~difftools.training.TrainerConfig`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from difftools import checkpoint as ckpt_io
from difftools.training.objective import Objective, RunInfo
from difftools.training.optim import lr_lambda


class ClassifierObjective(Objective):
    """Train ``model`` (a :class:`~difftools.models.classifier.Classifier`) on ``images`` / ``labels``.

    Args:
        model: the classifier, called ``model(x, t)`` (t None unless noise-conditional).
        loss_fn: ``loss_fn(model, x0, y, generator) -> (loss, logs)``, e.g. ``ClassificationLoss``.
        images: uint8 [N, C, H, W] (pixels 0..255; fed to the model as 2 p / 255 - 1).
        labels: long [N].
        batch_size: images per step; an epoch is ``max(N // batch_size, 1)`` steps (the last partial
            batch is dropped).
        seed: seed of the CPU generator (module docstring).
        process: the noise process of a noise-conditional classifier (recorded in checkpoints).
        dataset_info: the dataset's ``DatasetInfo`` (recorded in checkpoints).
        epochs: the run's epochs (only for the log line).
        log: called with one line at the end of each epoch (loss of its last batch, lr); None = quiet.
    """

    kind = "classifier"

    def __init__(self, model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 batch_size: int, seed: int = 0, process=None, dataset_info=None, epochs: int | None = None,
                 log: Callable[[str], None] | None = None):
        super().__init__(model)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{len(images)} images and {len(labels)} labels: need as many, and at least one")
        self.loss_fn = loss_fn
        self.images, self.labels = images, labels.long()
        self.batch_size = int(batch_size)
        self.steps_per_epoch = max(len(images) // self.batch_size, 1)
        self.process = process
        self.dataset_info = ckpt_io._plain(dataset_info) if dataset_info is not None else None
        self.epochs, self.log = epochs, log
        self.generator = torch.Generator().manual_seed(int(seed))
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1
        self._last_loss: torch.Tensor | None = None
        self._lr_at: Callable[[int], float] | None = None

    # ------------------------------------------------------------------ data
    def on_start(self, run: RunInfo, resumed_from: Path | None) -> None:
        self.images, self.labels = self.images.to(run.device), self.labels.to(run.device)
        if self._perm is not None:
            self._perm = self._perm.to(run.device)
        lr, factor = run.config.lr, lr_lambda(run.config)
        self._lr_at = lambda step: lr * factor(step)

    def batches(self, start: int, run: RunInfo):
        if run.world_size != 1:
            raise ValueError(f"{type(self).__name__} trains in one process (its data and augmentation come "
                             f"from one generator); this run has {run.world_size}")
        return self._indices(start)

    def _indices(self, start: int):
        """Index tensors (on the device) of batch start, start + 1, ...; the permutation of a new epoch
        is drawn when its first batch is requested, i.e. after the previous batch's augmentation."""
        n, b = len(self.images), self.batch_size
        for k in itertools.count(start):
            epoch, i = divmod(k, self.steps_per_epoch)
            if epoch != self._perm_epoch:
                if i != 0:
                    raise ckpt_io.CheckpointError(
                        f"resuming at batch {i} of epoch {epoch}, but the saved permutation is of epoch "
                        f"{self._perm_epoch}: the checkpoint's objective state does not match its step")
                self._perm = torch.randperm(n, generator=self.generator).to(self.images.device)
                self._perm_epoch = epoch
            yield self._perm[i * b:(i + 1) * b]

    # ------------------------------------------------------------------ step
    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        x0 = self.images[batch].float() / 127.5 - 1
        loss, logs = self.loss_fn(self.model, x0, self.labels[batch], self.generator)
        self._last_loss = loss.detach()
        return loss, logs

    def after_step(self, step: int) -> dict:
        if self.log is not None and step % self.steps_per_epoch == 0:
            epoch = step // self.steps_per_epoch
            of = f"/{self.epochs}" if self.epochs is not None else ""
            self.log(f"epoch {epoch}{of}  loss {self._last_loss.item():.4f}  lr {self._lr_at(step):.4f}")
        return {}

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {"generator": self.generator.get_state(), "perm_epoch": torch.tensor([self._perm_epoch])}
        if self._perm is not None:
            state["perm"] = self._perm.cpu()
        return state

    def load_extra_state(self, state) -> None:
        missing = {"generator", "perm_epoch"} - set(state)
        if missing:
            raise ckpt_io.CheckpointError(f"the checkpoint's objective state lacks {sorted(missing)} "
                                          f"(written by another recipe than {type(self).__name__}?)")
        self.generator.set_state(state["generator"])
        self._perm_epoch = int(state["perm_epoch"][0])
        self._perm = state.get("perm")
        if self._perm is not None and len(self._perm) != len(self.images):
            raise ckpt_io.CheckpointError(
                f"the checkpoint's permutation covers {len(self._perm)} images, this run has "
                f"{len(self.images)}: resume with the same data (and data.subset)")

    def checkpoint_meta(self, step: int) -> dict:
        return ckpt_io.checkpoint_meta(self.model, kind=self.kind, process=self.process,
                                       dataset_info=self.dataset_info, step=step)
