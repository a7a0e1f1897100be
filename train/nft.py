"""DiffusionNFT fine-tuning of a flow DiT: ``python train/nft.py base=<checkpoint or run dir> [key=value]``.

Online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117; method and equations in
:mod:`difftools.rl.nft`, options in conf/nft.yaml, results in docs/nft.md). The recipe is an
objective of the shared training engine (:class:`difftools.rl.NFTObjective` on
:class:`difftools.training.Trainer`); this file is only the command line. Each iteration collects
``groups x group_size`` samples with the old policy (no CFG), rewards them, and takes
``inner_epochs x updates_per_epoch`` optimizer steps (by default one, accumulated over the whole
collection) before the soft old-policy update. A killed run continues with
``hydra.run.dir=<its dir> resume=auto`` and repeats the uninterrupted run's numbers on CPU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
from omegaconf import DictConfig

from difftools.rl.recipe import NFTResult, load_base, run_nft

log = logging.getLogger("train.nft")

__all__ = ["NFTResult", "load_base", "main", "run"]


def run(cfg, out_dir, accelerator=None) -> NFTResult:
    """Fine-tune as configured (``cfg``: the conf/nft.yaml mapping); writes to ``out_dir``."""
    return run_nft(cfg, out_dir, accelerator)


@hydra.main(version_base="1.3", config_path="../conf", config_name="nft")
def main(cfg: DictConfig) -> float:
    from accelerate.utils import broadcast_object_list
    from hydra.core.hydra_config import HydraConfig

    from difftools.rl.recipe import as_config, collection_of, trainer_config
    from difftools.training.trainer import make_accelerator

    accelerator = make_accelerator(trainer_config(as_config(cfg), collection_of(as_config(cfg))))
    # every rank must write to rank 0's run directory (Hydra's timestamp may differ by a second)
    out_dir = Path(broadcast_object_list([HydraConfig.get().runtime.output_dir])[0])
    result = run(cfg, out_dir, accelerator)
    if accelerator.is_main_process:
        log.info(
            "done: iteration %d (%s), %.1f s; checkpoint %s; samples %s; best held-out %s",
            result.iteration,
            result.stopped_by,
            result.seconds,
            result.checkpoint,
            result.grid,
            result.best,
        )
    return result.losses[-1] if result.losses else math.nan


if __name__ == "__main__":
    main()
