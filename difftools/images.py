"""The toolkit's image convention and its uint8 form.

Datasets serve images as float tensors in [-1, 1] (``x = u / 127.5 - 1`` for uint8 pixels u), models
are trained and sampled in that range, and images are stored, shown and scored as uint8. The two
functions here are the only conversions, so a sample kept in memory and the same sample written as
PNG and read back are the same pixels.
"""

from __future__ import annotations

import torch


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 the way an image writer stores them: round((x + 1) * 127.5), clipped."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (the inverse of :func:`float_to_uint8` on its outputs)."""
    return x.float() / 127.5 - 1.0
