"""Online reinforcement-learning fine-tuning of diffusion models.

* :mod:`difftools.rl.nft`: DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): group advantages,
  the implicit-policy forward-process loss (:class:`NFTLoss`), training-time grids, the old policy.
* :mod:`difftools.rl.objective`: :class:`NFTObjective`, the recipe as an objective of the shared
  training engine (collection, rewards, old-policy update, safeguards, held-out evaluation).
* :mod:`difftools.rl.rewards`: reward models ``reward(images, labels) -> [B]``.
* :mod:`difftools.rl.safeguards`: the runaway guard (stop / raise the KL weight).
* :mod:`difftools.rl.evaluation`: judge accuracy, fd and diversity on held-out seeds; best-checkpoint rule.
* :mod:`difftools.rl.recipe`: conf/nft.yaml -> objective + engine options -> run (``train/nft.py``).
"""

from difftools.rl.evaluation import BestSelection, HeldOutEval, beyond_frontier, class_diversity
from difftools.rl.nft import (
    OLD_SCHEDULES,
    NFTLoss,
    OldPolicy,
    group_advantages,
    implicit_policies,
    nft_loss,
    old_decay,
    old_schedule,
    optimality_weights,
    shifted_times,
    soft_update,
)
from difftools.rl.objective import Collection, NFTObjective
from difftools.rl.rewards import BrightnessReward, ClassifierReward, Reward, build_reward
from difftools.rl.safeguards import RunawayError, RunawayGuard

__all__ = [
    "OLD_SCHEDULES", "BestSelection", "BrightnessReward", "ClassifierReward", "Collection", "HeldOutEval",
    "NFTLoss", "NFTObjective", "OldPolicy", "Reward", "RunawayError", "RunawayGuard", "beyond_frontier",
    "build_reward", "class_diversity", "group_advantages", "implicit_policies", "nft_loss", "old_decay",
    "old_schedule", "optimality_weights", "shifted_times", "soft_update",
]
