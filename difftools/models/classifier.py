"""A small convolutional image classifier, optionally noise-conditional, for metrics and guidance.

Three uses in difftools:

* feature extractor of the ``fd_<name>`` Fréchet distance (penultimate, globally pooled features;
  the honest replacement for FID where Inception weights are unavailable),
* class accuracy of class-conditional samples,
* with ``noise_conditional=True`` a time-dependent classifier p(y | x_t, t) whose input gradient
  grad_x log p(y | x_t, t) is classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233), and
  a reward / attribute model.

Reading a trained classifier from its checkpoint is :func:`difftools.metrics.features.load_classifier`
(checkpoints are a layer above the networks).

Architecture: a VGG-like stack (Simonyan & Zisserman 2014, arXiv 1409.1556) with BatchNorm: a stem
convolution, then per stage ``conv -> maxpool 2 -> BN -> GELU`` followed by ``depth - 1`` further
``conv -> BN -> GELU`` layers, global average pooling and a linear head. Noise conditioning is
GroupNorm instead of BatchNorm and FiLM (Perez et al. 2017, arXiv 1709.07871) of every normalised
activation,
h <- h * (1 + gamma(t)) + beta(t), from a sinusoidal embedding of 1000 t (as in DiT); the FiLM
layers start at zero so a fresh conditional classifier equals the unconditional one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from difftools.models.registry import register_rebuildable


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of 1000 t (t in [0, 1]): [cos(1000 t w_k), sin(1000 t w_k)],
    w_k = max_period^(-k / (dim/2)) (Vaswani et al. 2017, arXiv 1706.03762)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConvBNAct(nn.Module):
    """conv3x3 -> (maxpool 2) -> norm -> (FiLM from t) -> GELU.

    The norm is BatchNorm for clean-image classifiers, GroupNorm for noise-conditional ones:
    BatchNorm's running statistics average over all noise levels and fit none of them (ADM's
    time-dependent classifier uses GroupNorm for the same reason)."""

    def __init__(self, c_in: int, c_out: int, pool: bool, time_dim: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = pool
        self.norm = nn.GroupNorm(math.gcd(8, c_out), c_out) if time_dim else nn.BatchNorm2d(c_out)
        self.film = nn.Linear(time_dim, 2 * c_out) if time_dim else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)
        if self.pool:
            x = F.max_pool2d(x, 2)
        x = self.norm(x)
        if self.film is not None and temb is not None:
            gamma, beta = self.film(temb).to(x.dtype)[:, :, None, None].chunk(2, dim=1)
            x = x * (1 + gamma) + beta
        return F.gelu(x)


@register_rebuildable
class Classifier(nn.Module):
    """Image classifier ``logits = net(x, t=None)``; ``features(x, t)`` gives the pooled
    penultimate activations ([B, widths[-1]]).

    Args:
        in_channels, image_size, num_classes: the data it classifies (x in [-1, 1]).
        widths: channels of the stem and of each stage; every stage halves the resolution.
        depth: convolutions per stage.
        noise_conditional: take (x_t, t) with t in [0, 1] (t = 0: clean data); t=None means t = 0.
        time_dim: width of the time embedding (noise-conditional only).
        dropout: before the linear head.
        name: the feature-space name used in metric names (``fd_<name>``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        widths: tuple[int, ...] | list[int] = (64, 128, 256),
        depth: int = 2,
        noise_conditional: bool = False,
        time_dim: int = 128,
        dropout: float = 0.0,
        name: str = "classifier",
    ):
        super().__init__()
        if image_size < 2 ** (len(widths) - 1):
            raise ValueError(f"image_size {image_size} is too small for {len(widths) - 1} stages")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.widths, self.depth = tuple(int(w) for w in widths), int(depth)
        self.noise_conditional, self.time_dim, self.dropout_p = noise_conditional, time_dim, dropout
        self.name = name
        tdim = time_dim if noise_conditional else 0
        if noise_conditional:
            self.time_mlp = nn.Sequential(
                nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
            )
        layers = [ConvBNAct(in_channels, self.widths[0], pool=False, time_dim=tdim)]
        for w_in, w in zip(self.widths[:-1], self.widths[1:], strict=False):
            layers.append(ConvBNAct(w_in, w, pool=True, time_dim=tdim))
            layers += [ConvBNAct(w, w, pool=False, time_dim=tdim) for _ in range(self.depth - 1)]
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.widths[-1], num_classes)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "widths": list(self.widths),
            "depth": self.depth,
            "noise_conditional": self.noise_conditional,
            "time_dim": self.time_dim,
            "dropout": self.dropout_p,
            "name": self.name,
        }

    def features(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        temb = None
        if self.noise_conditional:
            t = torch.zeros(x.shape[0], device=x.device) if t is None else torch.as_tensor(t, device=x.device)
            t = t.expand(x.shape[0]) if t.ndim == 0 else t
            temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        for layer in self.layers:
            x = layer(x, temb)
        return x.float().mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        return self.head(self.dropout(self.features(x, t)))

    def log_prob_grad(self, x: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        """grad_x log p(y | x_t, t): the classifier-guidance direction (arXiv 2105.05233, eq. 10)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logp = F.log_softmax(self(x, t).float(), dim=-1).gather(1, y[:, None]).sum()
            return torch.autograd.grad(logp, x)[0]
