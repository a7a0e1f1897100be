"""Batches gathered on the device from a copy of an in-memory dataset (``trainer.data_on_device``).

A dataset that is one image tensor plus labels (:class:`~difftools.data.ArrayDataset`: CIFAR-10,
MNIST, digits; 150 MB of uint8 for CIFAR-10's 50,000 training images) is copied to the GPU once.
Each step then takes its batch with one index gather, the uint8 -> [-1, 1] conversion and the
random flips as a few kernels on the device: no loader workers, no per-item Python, no host -> device
copy per step. The batch at step k is the loader's batch at step k exactly: the same
:class:`~difftools.training.state.BatchPlan` chooses the items and their flip bits, and the
conversion is the dataset's own arithmetic, so exact resume and the data order are unchanged.
"""

from __future__ import annotations

import torch

from difftools.data.base import ArrayDataset
from difftools.training.state import BatchPlan

#: largest dataset copied to the GPU under ``data_on_device=auto``: this fraction of its memory
AUTO_MAX_FRACTION = 0.25
DATA_ON_DEVICE = ("auto", "on", "off")


def device_copy_reason(dataset, device: torch.device) -> str | None:
    """Why ``dataset`` cannot be served from the device (None when it can)."""
    if not isinstance(dataset, ArrayDataset) or type(dataset).__getitem__ is not ArrayDataset.__getitem__:
        return f"{type(dataset).__name__} is not an in-memory ArrayDataset (images tensor + labels)"
    if device.type == "cuda":
        limit = AUTO_MAX_FRACTION * torch.cuda.get_device_properties(device).total_memory
        size = dataset.images.numel() * dataset.images.element_size()
        if size > limit:
            return (f"its images take {size / 2**30:.2f} GiB, more than {AUTO_MAX_FRACTION:.0%} of the GPU's "
                    f"{limit / AUTO_MAX_FRACTION / 2**30:.0f} GiB")
    return None


def use_device_data(mode: str, dataset, device: torch.device) -> bool:
    """``trainer.data_on_device``: ``auto`` (on CUDA, when the dataset qualifies), ``on`` (always;
    an error naming the reason when it cannot), ``off``."""
    if mode not in DATA_ON_DEVICE:
        raise ValueError(f"trainer.data_on_device must be one of {DATA_ON_DEVICE}, got {mode!r}")
    if mode == "off" or dataset is None:
        return False
    reason = device_copy_reason(dataset, device)
    if mode == "on" and reason is not None:
        raise ValueError(f"trainer.data_on_device=on: cannot serve the dataset from the device: {reason}; "
                         "set trainer.data_on_device=auto or off")
    return reason is None and (mode == "on" or device.type == "cuda")


class DeviceBatches:
    """Infinite iterator of ``(x float32 [b, C, H, W], y long [b])`` on ``device``, from batch ``start``
    of ``plan`` on (this rank's share of each global batch)."""

    def __init__(self, dataset: ArrayDataset, plan: BatchPlan, start: int, device: torch.device):
        self.dataset, self.plan, self.k, self.device = dataset, plan, int(start), device
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self._epoch, self._perm, self._flips = -1, None, None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch = self.plan.position(self.k)[0]
        if epoch != self._epoch:  # once per epoch: the plan's order, moved to the device
            perm, flips = self.plan.epoch_order(epoch)
            self._perm = perm.to(self.device)
            self._flips = None if flips is None else flips.to(self.device, torch.bool)
            self._epoch = epoch
        start = self.plan.start(self.k)
        self.k += 1
        idx = self._perm[start:start + self.plan.per_device]
        x = self.dataset.to_float(self.images[idx])
        if self._flips is not None and self.dataset.random_flip:
            x = torch.where(self._flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[idx]
