"""Masked (absorbing) discrete diffusion, its Gaussian duality and Masked Consistency Distillation.

* :mod:`~difftools.discrete.masked`: forward masking, MDLM NELBO loss, ancestral sampler (arXiv 2406.07524).
* :mod:`~difftools.discrete.duality`: Gaussian latent over one-hot vectors projected by argmax, calibrated
  schedule and shared-noise coupled pairs ("Latent Shadows", arXiv 2602.00792).
* :mod:`~difftools.discrete.distill`: consistency distillation with coupled or independent pairs.
* :mod:`~difftools.discrete.model`, :mod:`~difftools.discrete.trainer`, :mod:`~difftools.discrete.ngram`:
  tiny token transformer, resumable loop, character n-gram proxy metric.
Recipe: train/mcd.py + conf/mcd.yaml; docs/mcd.md.
"""

from difftools.discrete.distill import distill, distill_loss
from difftools.discrete.duality import GaussianDuality, independent_pair, keep_probability, snr_for_keep
from difftools.discrete.masked import MaskedDiffusion, ancestral_sample
from difftools.discrete.model import TokenTransformer

__all__ = [
    "GaussianDuality",
    "MaskedDiffusion",
    "TokenTransformer",
    "ancestral_sample",
    "distill",
    "distill_loss",
    "independent_pair",
    "keep_probability",
    "snr_for_keep",
]
