"""Online reinforcement-learning fine-tuning of diffusion models.

* :mod:`difftools.rl.nft`: DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): group advantages,
  the implicit-policy forward-process loss, the soft-updated old policy.
* :mod:`difftools.rl.rewards`: reward models ``reward(images, labels) -> [B]``.

The training recipe is ``train/nft.py`` (Hydra; ``conf/nft.yaml``).
"""

from difftools.rl.nft import (
    NFTObjective,
    OldPolicy,
    group_advantages,
    implicit_policies,
    nft_loss,
    old_decay,
    optimality_weights,
)
from difftools.rl.rewards import BrightnessReward, ClassifierReward, Reward, build_reward

__all__ = ["BrightnessReward", "ClassifierReward", "NFTObjective", "OldPolicy", "Reward", "build_reward",
           "group_advantages", "implicit_policies", "nft_loss", "old_decay", "optimality_weights"]
