"""Masked (absorbing) discrete diffusion, its Gaussian duality and Masked Consistency Distillation.

* :mod:`~difftools.discrete.masked`: forward masking and the MDLM NELBO (arXiv 2406.07524).
* :mod:`~difftools.discrete.duality`: Gaussian latent over one-hot vectors projected by argmax, calibrated
  schedule and shared-noise coupled masks ("Latent Shadows", arXiv 2602.00792).
* :mod:`~difftools.discrete.sampling`: the ancestral sampler and the duality's deterministic sampler.
* :mod:`~difftools.discrete.pairs`, :mod:`~difftools.discrete.distill`: distillation pairs and targets
  (teacher trajectory, SDTT, data-built), reverse / forward KL, Duo-style rounds.
* :mod:`~difftools.discrete.objectives`, :mod:`~difftools.discrete.judge`: the recipes as objectives of the
  training engine; the autoregressive judge (generative perplexity, per-sample entropy).
* :mod:`~difftools.models.token_transformer`: the token transformer (bidirectional or causal);
  :mod:`~difftools.discrete.ngram`: a character n-gram (model-free check).
* :mod:`~difftools.discrete.experiment`: the four-arm experiment (scripts/mcd_experiment.py).
Recipe: train/mcd.py + conf/mcd.yaml; docs/mcd.md.
"""

from difftools.discrete.distill import DistillObjective, distill, distill_loss, divergence
from difftools.discrete.duality import GaussianDuality, independent_pair, keep_probability, snr_for_keep
from difftools.discrete.judge import CausalLMObjective, sample_entropy, score
from difftools.discrete.masked import MaskedDiffusion
from difftools.discrete.objectives import MaskedLMObjective, load_token_model, trainer_config
from difftools.discrete.pairs import make_pair, teacher_path
from difftools.discrete.sampling import RevealNoise, ancestral_sample, deterministic_sample, sample
from difftools.models.token_transformer import TokenTransformer

__all__ = [
    "CausalLMObjective",
    "DistillObjective",
    "GaussianDuality",
    "MaskedDiffusion",
    "MaskedLMObjective",
    "RevealNoise",
    "TokenTransformer",
    "ancestral_sample",
    "deterministic_sample",
    "distill",
    "distill_loss",
    "divergence",
    "independent_pair",
    "keep_probability",
    "load_token_model",
    "make_pair",
    "sample",
    "sample_entropy",
    "score",
    "snr_for_keep",
    "teacher_path",
    "trainer_config",
]
