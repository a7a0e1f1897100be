"""Training losses. Each is an ``nn.Module`` called ``loss_fn(model, x0, y, generator=None) ->
(loss scalar, logs: dict[str, tensor])``. A loss's own parameters (e.g. the alignment projector)
are trained with the model and saved in the training state, never in the exported weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn

from difftools.config import check_node, signature_schema
from difftools.losses.alignment import build_aligned_loss
from difftools.losses.autoencoder import AutoencoderLoss
from difftools.losses.classification import ClassificationLoss
from difftools.losses.denoising import T_DISTRIBUTIONS, WEIGHTINGS, DenoisingLoss, DenoisingTerms
from samplers.process import PREDICTIONS

__all__ = ["AutoencoderLoss", "ClassificationLoss", "DenoisingLoss", "DenoisingTerms", "build_loss",
           "check_loss_node"]

_DENOISING_KEYS = ("prediction", "t_distribution", "weighting", "t_min", "t_max", "t_mean", "t_std",
                   "min_snr_gamma", "sigma_data")
_ALIGN_SCHEMA = {"weight": float, "depth": int | None, "features": str, "beta": float,
                 "widths": list[int] | None}


def check_loss_node(cfg_loss: Mapping) -> dict:
    """The ``loss`` config node as a plain dict, each value checked against the type of the
    :class:`DenoisingLoss` argument (or ``align`` option) it feeds and the fixed choices; raises
    ``difftools.config.ConfigError`` naming the key, value and expected type (or an unknown key)."""
    schema = {k: v for k, v in signature_schema(DenoisingLoss.__init__).items() if k in _DENOISING_KEYS}
    choices = {"prediction": PREDICTIONS, "t_distribution": T_DISTRIBUTIONS, "weighting": WEIGHTINGS,
               "align.features": ("latent", "encoder")}
    return check_node(cfg_loss, {**schema, "align": _ALIGN_SCHEMA}, node="loss", choices=choices)


def build_loss(cfg_loss: Mapping, model: nn.Module, process, vae=None) -> nn.Module:
    """Build the training loss from the ``loss`` config node.

    Keys: the :class:`DenoisingLoss` arguments, plus an optional ``align`` subtree (SRA² feature
    alignment, :mod:`difftools.losses.alignment`): ``weight`` (0 = off), ``depth`` (null = from the
    model depth), ``features``, ``beta``, ``widths`` (null = 2D each). The model is only read
    (hidden size, depth, patch size, channels); the loss must not keep it as a submodule, or its
    parameters would be counted twice.
    """
    cfg = check_loss_node(cfg_loss)
    align = cfg.pop("align", None)
    loss = DenoisingLoss(process, **cfg)
    align = {k: align[k] for k in align} if align is not None else {}
    if float(align.get("weight", 0.0) or 0.0) <= 0.0:
        return loss
    return build_aligned_loss(loss, align, model, vae)
