#!/usr/bin/env python
"""Train a classifier on any toolkit dataset: ``python train/classifier.py [data=<name>] [key=value ...]``.

Config: conf/classifier.yaml (data group shared with train/dit.py). The classifier
(:class:`difftools.models.classifier.Classifier`) is saved in the project's checkpoint format
(``kind: classifier``) and serves as the feature space of ``fd_<name>``, the class-accuracy
metric of samples, and (``model.noise_conditional=true``) classifier guidance / rewards. Prints one
JSON line: test accuracy, training seconds, images/s, checkpoint path.

Training runs on the engine (:func:`difftools.metrics.classifier.fit_classifier`): the run directory
holds ``checkpoints/`` (every ``train.ckpt_every`` steps and at the end), ``metrics.jsonl`` and
``run.lock``; ``hydra.run.dir=<run> train.resume=auto`` continues an interrupted run exactly.
``data.subset=half0`` / ``half1`` trains on one fixed half of the training split (the test split is
always whole), e.g. a reward classifier and an independent judge.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train.classifier")


@hydra.main(version_base="1.3", config_path="../conf", config_name="classifier")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from difftools.metrics.classifier import default_classifier_path, fit_classifier, preset, save_classifier
    from difftools.models.classifier import Classifier

    if cfg.cpu_threads:
        torch.set_num_threads(int(cfg.cpu_threads))
    torch.manual_seed(int(cfg.seed))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    flip = bool(data_cfg.get("random_flip", False))
    # flips are drawn per step by the trainer, not baked into the stored tensors; data.subset selects
    # training images only: the reported accuracy is always on the whole test split
    train = instantiate(cfg.data, split="train", random_flip=False)
    test_cfg = {"subset": None} if "subset" in cfg.data else {}
    test = instantiate(cfg.data, split="test", random_flip=False, **test_cfg)
    info = train.info
    p = preset(info.name)
    m, t = cfg.model, cfg.train
    name = cfg.name or f"clf_{info.name}{info.image_size}" + ("_t" if m.noise_conditional else "")
    model = Classifier(
        info.channels,
        info.image_size,
        info.num_classes,
        m.widths or p["widths"],
        m.depth or p["depth"],
        noise_conditional=bool(m.noise_conditional),
        time_dim=int(m.time_dim),
        dropout=float(m.dropout),
        name=name,
    )
    process = instantiate(cfg.process) if m.noise_conditional else None
    hp = dict(
        epochs=t.epochs or p["epochs"],
        batch_size=t.batch_size or p["batch_size"],
        lr=t.lr or p["lr"],
        weight_decay=float(t.weight_decay),
        label_smoothing=float(t.label_smoothing),
        warmup=float(t.warmup),
        flip=flip if t.flip is None else bool(t.flip),
        shift=p["shift"] if t.shift is None else int(t.shift),
    )
    log.info("training %s on %s (%d images, %dpx): %s", name, info.name, len(train), info.image_size, hp)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    res = fit_classifier(
        model, train, test, process=process, seed=int(cfg.seed), device=cfg.device, log=log.info,
        run_dir=run_dir, resume=t.resume, ckpt_every=int(t.ckpt_every),
        run_config=OmegaConf.to_container(cfg, resolve=True), **hp,
    )
    out = Path(cfg.out or run_dir / "classifier")
    save_classifier(
        out, model, info, res, config=OmegaConf.to_container(cfg, resolve=True) | {"fit": hp}, process=process
    )
    if cfg.install_as_default:
        target = default_classifier_path(info.name, info.image_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    print(
        json.dumps(
            {
                "name": name,
                "test_accuracy": res.test_accuracy,
                "train_seconds": res.train_seconds,
                "images_per_second": res.images_per_second,
                "epochs": res.epochs,
                "checkpoint": str(out),
            }
        )
    )
    return res.test_accuracy


if __name__ == "__main__":
    main()
