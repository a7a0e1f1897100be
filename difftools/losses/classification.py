"""The classifier's training loss: label-smoothed cross-entropy on augmented, optionally noised images.

    x = shift(flip(x0));   noise-conditional: x_t = alpha(t) x + sigma(t) eps, t ~ U(0, 1), eps ~ N(0, I)
    L = CE_smooth(f(x_t, t), y) = (1 - s) CE(f, y) + s mean_c CE(f, c)

Label smoothing with weight s (Szegedy et al. 2016, arXiv 1512.00567, sec. 7). Flips (where the data
allows them) and random translations by up to ``shift`` pixels (reflect padding) are drawn per image.
A noise-conditional classifier p(y | x_t, t) (classifier guidance, Dhariwal & Nichol 2021,
arXiv 2105.05233) sees x_t at a uniform t on the given process; otherwise t is None.

Every random number comes from the ``generator`` argument, a CPU generator, in a fixed order per
batch: flip bits, row shifts, column shifts, t, eps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from difftools.data.augment import random_hflip, random_shift


class ClassificationLoss(nn.Module):
    """``loss_fn(model, x0, y, generator) -> (loss, logs)``; see the module docstring.

    Args:
        label_smoothing: s above (0 = plain cross-entropy).
        flip: mirror each image left-right with probability 1/2 (not for digits).
        shift: maximal random translation in pixels (0 = none).
        process: noise process of a noise-conditional classifier; None for a clean-image one.
        channels_last: hand the network channels-last inputs (faster convolutions on CUDA).
    """

    def __init__(self, label_smoothing: float = 0.1, flip: bool = False, shift: int = 2, process=None,
                 channels_last: bool = False):
        super().__init__()
        self.label_smoothing, self.flip, self.shift = float(label_smoothing), bool(flip), int(shift)
        self.process, self.channels_last = process, bool(channels_last)

    def forward(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        x = random_hflip(x0, generator) if self.flip else x0
        x = random_shift(x, self.shift, generator)
        t = None
        if self.process is not None:
            t = torch.rand(len(x), generator=generator).to(x.device)
            eps = torch.randn(x.shape, generator=generator).to(x.device)
            x = self.process.marginal(x, eps, t).float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x, t).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(-1) == y).float().mean()
        return loss, {"accuracy": accuracy}
