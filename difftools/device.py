"""Device choice shared by the library, the training recipes and the scripts (no heavy imports)."""

from __future__ import annotations

import torch


def default_device(device=None) -> torch.device:
    """``device`` as a torch.device; None (or "auto"): CUDA when present, else the CPU."""
    if device is None or isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
