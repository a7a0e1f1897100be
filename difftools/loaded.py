"""A trained model as :func:`difftools.load` returns it, and what sampling needs from it.

``run = difftools.load(ckpt)`` is a :class:`Loaded`: the model in eval mode, its noise process and
prediction type, the autoencoder of a latent run, the run config, the dataset it was trained on.
Everything a script used to re-derive from those fields is a method here, defined once::

    run = difftools.load("runs/dit/<date>")
    mf = run.model_fn()                          # ModelFn: x0 / eps at (x_t, t), counts NFE
    x_T = float(run.process.sigma(1.0)) * torch.randn(8, *run.sample_shape)
    y = run.labels(range(8))                     # 0, 1, ..., K-1, 0, ... (None if unconditional)
    x0 = samplers.sample(mf, x_T, "dpmpp_2m", steps=10, **run.cond(y))
    images = run.decode_uint8(x0)                # autoencoder decode, clamp, uint8 [8, C, H, W]

A model that is not a checkpoint (a network built in code, the random DiT of the ``--smoke``
modes) becomes the same object with ``Loaded(model, process, prediction)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftools.images import float_to_uint8
from samplers import ModelFn


@dataclass
class Loaded:
    """A model with everything needed to sample from it.

    ``process`` / ``prediction`` / ``autoencoder`` are None for models that are not denoisers (e.g.
    classifiers); ``config`` is the run's resolved config (``{}`` for a model built in code),
    ``dataset_info`` the training data's :class:`~difftools.data.DatasetInfo` fields as a dict,
    ``path`` the checkpoint directory and ``step`` its training step (None when not from a checkpoint).
    """

    model: torch.nn.Module
    process: Any = None
    prediction: str | None = None
    autoencoder: Any = None
    config: dict = field(default_factory=dict)
    dataset_info: dict | None = None
    path: Path | None = None
    step: int | None = None

    @property
    def name(self) -> str:
        """How errors name this run: its checkpoint directory, else the model's class."""
        return str(self.path) if self.path is not None else f"a {type(self.model).__name__} built in code"

    # ------------------------------------------------------------------------------- the model
    @property
    def num_classes(self) -> int:
        """Number of classes the model is conditioned on; 0 for an unconditional model."""
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def null_class(self) -> int | None:
        """The label that means "no class" (the unconditional branch of classifier-free guidance);
        None for an unconditional model."""
        if not self.num_classes:
            return None
        return int(getattr(self.model, "null_class", self.num_classes))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample where the solver runs: the latent of a latent run, else the image.

        Read from the network (``in_channels``, ``input_size``: DiT and its wrappers), else from the
        training data's info; a ValueError naming the run when neither says."""
        m = self.model
        if hasattr(m, "in_channels") and hasattr(m, "input_size"):
            return int(m.in_channels), int(m.input_size), int(m.input_size)
        info = self.dataset_info or {}
        if info.get("channels") and info.get("image_size"):
            return int(info["channels"]), int(info["image_size"]), int(info["image_size"])
        raise ValueError(f"{self.name}: cannot tell the sample shape: {type(m).__name__} has no "
                         "in_channels / input_size and the checkpoint records no dataset_info")

    def model_fn(self) -> ModelFn:
        """The model as a :class:`samplers.ModelFn` (x0 / eps at (x_t, t) under its process and
        prediction type); a fresh NFE counter each call."""
        if self.process is None or self.prediction is None:
            kind = (self.config.get("checkpoint") or {}).get("kind", "non-denoiser")
            raise ValueError(f"{self.name} is a {kind} model, not a denoiser: it has no noise process / "
                             "prediction type to sample with")
        return ModelFn(self.model, self.process, self.prediction)

    # ------------------------------------------------------------------------------ conditioning
    def labels(self, indices: int | Sequence[int], class_label: int | None = None) -> torch.Tensor | None:
        """Labels of a class-balanced batch: image i gets ``i mod num_classes`` (``indices`` = n means
        images 0..n-1), so any run of consecutive indices is balanced and image i's label does not
        depend on the batch it is drawn in; ``class_label`` gives every image that class instead.
        None for an unconditional model."""
        indices = range(indices) if isinstance(indices, int) else indices
        if not self.num_classes:
            return None
        if class_label is not None:
            if not 0 <= int(class_label) < self.num_classes:
                raise ValueError(f"class_label {class_label} outside 0..{self.num_classes - 1} ({self.name} "
                                 f"has {self.num_classes} classes)")
            return torch.full((len(indices),), int(class_label), dtype=torch.long)
        return torch.as_tensor(list(indices), dtype=torch.long) % self.num_classes

    @staticmethod
    def cond(labels: torch.Tensor | None) -> dict:
        """The model's conditioning keywords for ``labels``: ``{"y": labels}``, or ``{}`` for None."""
        return {} if labels is None else {"y": labels}

    def null_cond(self, labels: torch.Tensor) -> dict:
        """The unconditional keywords matching a batch of ``labels`` (every label the null class), the
        ``uncond`` of :func:`samplers.guidance.guided`."""
        if self.null_class is None:
            raise ValueError(f"{self.name} is unconditional: there is no null class to guide against")
        return {"y": torch.full_like(labels, self.null_class)}

    # -------------------------------------------------------------------------------- decoding
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples -> float images in [-1, 1]: the autoencoder's decode for a latent run, then clamped."""
        if self.autoencoder is not None:
            x = self.autoencoder.decode(x)
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def decode_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Samples -> uint8 images [B, C, H, W], as an image writer stores them (:meth:`decode`, then
        :func:`difftools.images.float_to_uint8`); on x's device."""
        return float_to_uint8(self.decode(x))

    # ---------------------------------------------------------------------------------- the data
    def reference_dataset(self) -> tuple[str, int, str | None]:
        """(name, image size, data root) of the image dataset this run's samples are compared with.

        The training dataset as the checkpoint records it; for a run on cached latents, the pixel
        dataset they were encoded from, at the decoded size. A ValueError when the run does not say
        (an image folder or latent cache without its root): pass the dataset explicitly then."""
        info = self.dataset_info or {}
        data_cfg = dict(self.config.get("data") or {})
        name = info.get("name") or data_cfg.get("name")
        size = info.get("image_size") or data_cfg.get("image_size")
        if name and name.startswith("latents:"):  # cached latents of <source>: compare decoded images to it
            name, size = name.split(":", 1)[1], int(size) * int(getattr(self.autoencoder, "downsample", 1))
        if not name or not size or (name in ("latents", "image_folder") and not data_cfg.get("root")):
            raise ValueError(f"{self.name}: cannot tell which image dataset to compare against (dataset "
                             f"{name!r}, image size {size!r}); pass dataset=<name> (and image_size=) "
                             "explicitly")
        return name, int(size), data_cfg.get("root")
