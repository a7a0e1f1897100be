"""Training losses. Each is an ``nn.Module`` called ``loss_fn(model, x0, y, generator=None) ->
(loss scalar, logs: dict[str, tensor])``. A loss's own parameters (e.g. the alignment projector)
are trained with the model and saved in the training state, never in the exported weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn

from difftools.losses.alignment import AlignedLoss
from difftools.losses.denoising import DenoisingLoss, DenoisingTerms

__all__ = ["DenoisingLoss", "DenoisingTerms", "build_loss"]

_DENOISING_KEYS = ("prediction", "t_distribution", "weighting", "t_min", "t_max", "t_mean", "t_std",
                   "min_snr_gamma", "sigma_data")


def build_loss(cfg_loss: Mapping, model: nn.Module, process, vae=None) -> nn.Module:
    """Build the training loss from the ``loss`` config node.

    Keys: the :class:`DenoisingLoss` arguments, plus an optional ``align`` subtree (SRA² feature
    alignment, :mod:`difftools.losses.alignment`): ``weight`` (0 = off), ``depth``, ``features``,
    ``beta``, ``widths``. The model is only read (hidden size, patch size, channels); the loss must
    not keep it as a submodule, or its parameters would be counted twice.
    """
    cfg = {k: cfg_loss[k] for k in cfg_loss}
    align = cfg.pop("align", None)
    unknown = sorted(set(cfg) - set(_DENOISING_KEYS))
    if unknown:
        raise ValueError(f"unknown loss option(s) {unknown}; expected {list(_DENOISING_KEYS)} and 'align'")
    loss = DenoisingLoss(process, **cfg)
    align = {k: align[k] for k in align} if align is not None else {}
    if float(align.get("weight", 0.0) or 0.0) <= 0.0:
        return loss
    features = align.get("features", "latent")
    if features == "encoder":
        target_channels = vae.feature_channels("encoder")
    else:
        target_channels = model.in_channels
    widths = align.get("widths")
    return AlignedLoss(loss, hidden_size=model.hidden_size, patch_size=model.patch_size,
                       target_channels=target_channels, depth=int(align.get("depth", 2)),
                       weight=float(align["weight"]), beta=float(align.get("beta", 0.05)), features=features,
                       widths=None if widths is None else [int(w) for w in widths], vae=vae)
