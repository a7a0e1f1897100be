"""Train a small autoencoder for latent diffusion (Hydra entry point, config conf/vae.yaml).

    python train/vae.py data.name=cifar10 train.steps=20000
    python train/vae.py data.name=mnist data.image_size=32 model.type=tiny

KL type: diffusers ``AutoencoderKL`` (default 4x downsampling, 4 latent channels) trained with

    L = mean |x - D(z)|  (or squared)  +  kl_weight * KL(q(z|x) || N(0, I)) / (C H W),   z ~ q(z|x)

(the LDM recipe without the perceptual/GAN terms, arXiv 2112.10752). Tiny type: ``AutoencoderTiny``
with the reconstruction term only. After training, ``scaling_factor = 1/std`` and ``shift_factor =
mean`` of the encoded training latents are written into the model config, and the model is saved
with ``save_pretrained`` (safetensors) to ``out``; ``metrics.json`` there records the held-out
reconstruction PSNR. Load it with ``build_autoencoder("kl", path=out)``.

Training runs on the engine (:class:`difftools.training.Trainer` with
:class:`difftools.training.autoencoder.AutoencoderObjective`): AdamW without warm-up or EMA, bf16 on
CUDA, the NaN/inf stop, ``metrics.jsonl`` / TensorBoard, and checkpoints (``kind: autoencoder``)
every ``train.ckpt_every`` steps in the run directory (``run_dir``; null = Hydra's run directory,
the parent of the default ``out``), with previews (held-out images above their reconstructions) in
``samples/``. ``hydra.run.dir=<run> train.resume=auto`` continues an interrupted run exactly.
Several GPUs: ``accelerate launch train/vae.py ...``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftools.models.autoencoders.trainable import (  # noqa: E402
    TYPES,
    estimate_factors,
    evaluate_psnr,
    new_diffusers_autoencoder,
)
from difftools.models.autoencoders.trainable import reconstruct as _reconstruct  # noqa: E402, F401

log = logging.getLogger("train.vae")

MODEL_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
              "mid_block_add_attention")
# the ``train`` node: its keys, their types and fixed choices (checked before anything is built)
TRAIN_SCHEMA = {"steps": int, "batch_size": int, "lr": float, "weight_decay": float, "recon": str,
                "kl_weight": float, "grad_clip": float, "seed": int, "device": str, "bf16": bool,
                "num_workers": int, "num_threads": int | None, "log_every": int, "eval_images": int,
                "scale_images": int, "ckpt_every": int, "keep_last": int, "sample_every": int,
                "eval_every": int, "time_limit": float | None, "resume": str | None}
TRAIN_CHOICES = {"recon": ("l1", "l2"), "device": ("auto", "cpu", "cuda")}


def build_model(mcfg, channels: int):
    """Fresh diffusers autoencoder from the ``model`` config node."""
    return new_diffusers_autoencoder(mcfg.type, channels, **{k: mcfg[k] for k in MODEL_KEYS})


def check_config(cfg: DictConfig) -> dict:
    """The ``train`` node as a plain dict, every value checked (a ConfigError names key and value)."""
    from difftools.config import check_node, check_value

    check_value("model.type", cfg.model.type, str, TYPES)
    return check_node(OmegaConf.to_container(cfg.train, resolve=True), TRAIN_SCHEMA, node="train",
                      choices=TRAIN_CHOICES)


def trainer_config(tc: dict):
    """The engine's options for the ``train`` node: AdamW at a constant lr (no warm-up), no EMA."""
    from difftools.training import TrainerConfig

    if tc["device"] == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda, but torch sees no CUDA device (use train.device=auto or cpu)")
    return TrainerConfig(
        batch_size=tc["batch_size"], max_steps=tc["steps"], time_limit=tc["time_limit"], optimizer="adamw",
        lr=tc["lr"], warmup_steps=0, lr_decay="constant", weight_decay=tc["weight_decay"],
        grad_clip=tc["grad_clip"], ema_decay=0.0, mixed_precision="auto" if tc["bf16"] else "no",
        device="cpu" if tc["device"] == "cpu" else "auto", seed=tc["seed"], log_every=tc["log_every"],
        ckpt_every=tc["ckpt_every"], keep_last=tc["keep_last"], sample_every=tc["sample_every"],
        eval_every=tc["eval_every"], num_workers=tc["num_workers"], cpu_threads=tc["num_threads"],
        resume=tc["resume"])


def run_directory(cfg: DictConfig) -> Path | None:
    """``run_dir``, else Hydra's run directory, else None (called as a library without Hydra: an
    in-memory run that writes only ``out``)."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def run(cfg: DictConfig) -> dict:
    """Train, evaluate, estimate the latent scale and save; returns the metrics dict (on the main
    process; other processes return an empty dict)."""
    from accelerate.utils import broadcast_object_list

    from difftools.data import build_dataset
    from difftools.losses.autoencoder import AutoencoderLoss
    from difftools.models.autoencoders import TrainableAutoencoder
    from difftools.training import DivergedError, NonFiniteLossError, Trainer
    from difftools.training.autoencoder import AutoencoderObjective
    from difftools.training.trainer import make_accelerator

    t0 = time.time()
    tc = check_config(cfg)
    tcfg = trainer_config(tc)
    if tc["num_threads"]:
        torch.set_num_threads(tc["num_threads"])
    # Tiny weights/gradients become denormal floats late in CPU training and slow every op ~10x.
    torch.set_flush_denormal(True)
    accelerator = make_accelerator(tcfg)
    run_dir = run_directory(cfg)
    if run_dir is not None:  # every rank writes to rank 0's run directory
        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    train_set = build_dataset(
        cfg.data.name,
        root=cfg.data.root,
        split="train",
        image_size=cfg.data.image_size,
        random_flip=bool(cfg.data.random_flip),
    )
    try:
        eval_set = build_dataset(
            cfg.data.name, root=cfg.data.root, split=cfg.data.eval_split, image_size=cfg.data.image_size
        )
    except (FileNotFoundError, ValueError) as e:
        log.warning("no %s split (%s); reporting PSNR on training images", cfg.data.eval_split, e)
        eval_set = build_dataset(
            cfg.data.name, root=cfg.data.root, split="train", image_size=cfg.data.image_size
        )
    info = train_set.info
    down = 2 ** (len(cfg.model.block_out_channels) - 1)
    if info.image_size % down:
        raise ValueError(f"image size {info.image_size} is not divisible by the downsampling {down}")
    torch.manual_seed(tc["seed"])  # the same initial weights on every rank and in every run
    model = TrainableAutoencoder(cfg.model.type, info.channels, **{k: cfg.model[k] for k in MODEL_KEYS})
    objective = AutoencoderObjective(model, AutoencoderLoss(tc["recon"], tc["kl_weight"]), dataset_info=info,
                                     eval_set=eval_set, eval_images=tc["eval_images"])
    trainer = Trainer(objective, tcfg, run_dir, dataset=train_set,
                      run_config=OmegaConf.to_container(cfg, resolve=True), accelerator=accelerator)
    try:
        result = trainer.train()
    except (NonFiniteLossError, DivergedError) as err:
        # the engine's advice names its own options (trainer.lr, trainer.resume); here they are train.*
        raise type(err)(str(err).replace("trainer.", "train.")) from None
    if not trainer.is_main:
        return {}
    net = model.net
    eval_psnr = evaluate_psnr(net, eval_set, tc["eval_images"], trainer.device)
    scale, shift = estimate_factors(net, train_set, tc["scale_images"], trainer.device)
    # Both diffusers classes read these two config fields; build_autoencoder picks them up.
    net.register_to_config(scaling_factor=scale, shift_factor=shift)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    net.to("cpu").save_pretrained(str(out), safe_serialization=True)
    metrics = {
        "psnr_db": eval_psnr,
        "eval_split": cfg.data.eval_split,
        "eval_images": min(tc["eval_images"], len(eval_set)),
        "steps": result.step,
        "stopped_by": result.stopped_by,
        # NaN when nothing was left to train (a resume of a finished run); JSON has no NaN
        "final_loss": result.final_loss if math.isfinite(result.final_loss) else None,
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
        "scaling_factor": scale,
        "shift_factor": shift,
        "downsample": down,
        "latent_channels": int(cfg.model.latent_channels),
        "dataset": info.name,
        "image_size": info.image_size,
        "seconds": time.time() - t0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info(
        "saved %s: PSNR %.2f dB on %d %s images, scaling_factor %.4f shift %.4f",
        out,
        eval_psnr,
        metrics["eval_images"],
        cfg.data.eval_split,
        scale,
        shift,
    )
    return metrics


@hydra.main(version_base=None, config_path="../conf", config_name="vae")
def main(cfg: DictConfig) -> None:
    from difftools.config import ConfigError

    try:
        run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
