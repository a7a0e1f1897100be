"""How well an edit preserves its source: SSIM (Wang et al. 2004, IEEE TIP 13(4)).

Per image pair, with local means mu, variances s^2 and covariance s_xy under an 11 x 11 Gaussian
window (std 1.5), over the window positions inside the image (the original's ``valid`` filtering):

    SSIM(x, y) = mean over positions of
                 (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

with C1 = (0.01 L)^2, C2 = (0.03 L)^2 and L the dynamic range (images are mapped from [-1, 1] to
[0, 1], so L = 1); channels are averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ssim"]


def _gaussian_window(size: int, std: float, dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * std * std))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(dtype)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, std: float = 1.5) -> torch.Tensor:
    """SSIM per image of two batches [N, C, H, W] in [-1, 1] -> [N] (module docstring)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [N, C, H, W] batches of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(x.shape[-2:])} pixels are smaller than the {window}-pixel window")
    x = ((x.double() + 1) / 2)
    y = ((y.double() + 1) / 2)
    n, c = x.shape[:2]
    w = _gaussian_window(window, std, x.dtype).to(x.device)[None, None]
    flat = lambda t: t.reshape(n * c, 1, *t.shape[-2:])  # noqa: E731
    mu_x, mu_y = F.conv2d(flat(x), w), F.conv2d(flat(y), w)
    sxx = F.conv2d(flat(x * x), w) - mu_x * mu_x
    syy = F.conv2d(flat(y * y), w) - mu_y * mu_y
    sxy = F.conv2d(flat(x * y), w) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return (num / den).reshape(n, c, -1).mean((1, 2)).float()
