"""Train a DiT with a denoising loss: ``python train/dit.py [group=option ...] [key=value ...]``.

Hydra lives only here; everything below it is the plain-Python library. Config: conf/dit.yaml
(groups model/ data/ process/ vae/ trainer/). Several GPUs: ``accelerate launch train/dit.py ...``.
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate as _instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train.dit")


def instantiate(node, **kw):
    """hydra.utils.instantiate, re-raising the library's own error (e.g. FileNotFoundError for
    missing data) instead of Hydra's wrapper, so the message the user sees is the clear one."""
    try:
        return _instantiate(node, **kw)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def check_config(cfg: DictConfig):
    """Type-check the trainer, loss and eval nodes before anything is built, so that a wrong value
    (``trainer.max_steps=abc``, ``eval.num_samples=1e3.5``) fails in seconds with a ConfigError
    naming key, value and expected type, not deep in the loop or after training. Returns the
    :class:`TrainerConfig`."""
    from difftools.config import check_node, signature_schema
    from difftools.losses import check_loss_node
    from difftools.training import TrainerConfig

    tcfg = TrainerConfig.from_dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    check_loss_node(OmegaConf.to_container(cfg.loss, resolve=True))
    try:
        from difftools.metrics.evaluate import evaluate_checkpoint
    except ImportError:
        return tcfg  # evaluate() warns and skips
    # eval holds evaluate_checkpoint's keywords; unknown ones go on to the sampler (**sampler_opts)
    schema = {"enabled": bool, **signature_schema(evaluate_checkpoint, skip=("checkpoint", "log"))}
    check_node(OmegaConf.to_container(cfg.eval, resolve=True), schema, node="eval", allow_unknown=True)
    return tcfg


def build_run(cfg: DictConfig):
    """Dataset, autoencoder, model, process and loss from the config (no training yet; the
    objective that trains them is :func:`build_objective`'s)."""
    from difftools.losses import build_loss
    from difftools.models.autoencoders import build_autoencoder
    from difftools.models.precond import apply_precond

    dataset = instantiate(cfg.data)
    info = dataset.info
    vae_cfg = OmegaConf.to_container(cfg.vae, resolve=True)
    if vae_cfg.get("name", "identity") == "identity":
        vae_cfg["channels"] = info.channels
    autoencoder = build_autoencoder(**vae_cfg)
    if hasattr(dataset, "check_autoencoder"):  # cached latents: same autoencoder, the cache's scale
        dataset.check_autoencoder(autoencoder)
        shape = (info.channels, info.image_size, info.image_size)
    else:
        shape = autoencoder.latent_shape((info.channels, info.image_size, info.image_size))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
    model = instantiate(cfg.model, input_size=shape[1], in_channels=shape[0], num_classes=info.num_classes)
    process = instantiate(cfg.process)
    model = apply_precond(model, cfg.get("precond"), process)  # e.g. EDM's c_in/c_skip/c_out wrapper
    loss_fn = build_loss(cfg.loss, model, process, autoencoder)
    return dataset, autoencoder, model, process, loss_fn


def evaluate(checkpoint, cfg_eval: DictConfig):
    """Final evaluation hook: ``difftools.metrics.evaluate.evaluate_checkpoint(ckpt, **eval)``.

    Runs when ``eval.enabled`` and the metrics module is present; prints and returns its dict.
    """
    if not cfg_eval.enabled:
        return None
    try:
        from difftools.metrics.evaluate import evaluate_checkpoint
    except ImportError:
        log.warning("eval.enabled=true but difftools.metrics.evaluate is not available: skipped")
        return None
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg_eval, resolve=True).items() if k != "enabled"}
    metrics = evaluate_checkpoint(checkpoint, **kwargs)
    print(json.dumps(metrics))
    return metrics


def build_objective(cfg: DictConfig):
    """The dataset and the DiT recipe's :class:`DenoisingObjective` from the config (its sample
    grids follow the ``trainer.sample_*`` options)."""
    from difftools.training import DenoisingObjective

    dataset, autoencoder, model, process, loss_fn = build_run(cfg)
    objective = DenoisingObjective(model, loss_fn, process, cfg.loss.prediction, autoencoder=autoencoder,
                                   dataset_info=dataset.info)
    return dataset, objective


@hydra.main(version_base="1.3", config_path="../conf", config_name="dit")
def main(cfg: DictConfig) -> float:
    from accelerate.utils import broadcast_object_list

    from difftools.config import ConfigError
    from difftools.nn.fp8 import Float8Unavailable
    from difftools.training import Trainer
    from difftools.training.trainer import check_fp8, make_accelerator

    try:
        tcfg = check_config(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    accelerator = make_accelerator(tcfg)
    try:  # trainer.fp8 without torchao or on a GPU without fp8 tensor cores: say so before building
        check_fp8(tcfg, accelerator.device)
    except Float8Unavailable as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # every rank must write to rank 0's run directory (Hydra's timestamp may differ by a second)
    out_dir = broadcast_object_list([HydraConfig.get().runtime.output_dir])[0]
    dataset, objective = build_objective(cfg)
    trainer = Trainer(objective, tcfg, out_dir, dataset=dataset,
                      run_config=OmegaConf.to_container(cfg, resolve=True), accelerator=accelerator)
    result = trainer.train()
    if trainer.is_main:
        log.info("done: step %d, final loss %.5f, %.1f s; checkpoint %s; samples %s", result.step,
                 result.final_loss, result.seconds, result.checkpoint, result.grid)
        evaluate(result.checkpoint, cfg.eval)
    return result.final_loss


if __name__ == "__main__":
    main()
