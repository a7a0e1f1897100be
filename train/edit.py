#!/usr/bin/env python
"""Learn CASO semantic embeddings (arXiv 2505.14254): ``python train/edit.py base=<DiT run> [key=value ...]``.

Config: conf/edit.yaml. Everything but the embeddings is frozen: the DiT of ``base``, its
autoencoder and the attribute classifier. Writes ``<run>/embeddings.safetensors`` (the learned
vectors with their names, classifier classes and settings), ``<run>/checkpoints/`` (the training
engine's layout; resumable: pass ``out=<run>`` again), ``<run>/metrics.jsonl`` and prints one
JSON line with the mean target probability of the one-step estimates on the training images
before and after training. Apply the embeddings with
``python scripts/edit_images.py --embeddings <run>/embeddings.safetensors``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train.edit")


@hydra.main(version_base="1.3", config_path="../conf", config_name="edit")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from difftools.data import build_dataset
    from difftools.editing.attributes import images_and_labels
    from difftools.editing.caso import EmbeddingDiT, released_train_time
    from difftools.editing.embeddings import make_embeddings
    from difftools.editing.optimize import CasoConfig, one_step_probability, train_embeddings
    from difftools.editing.resources import load_attribute_classifier, load_base, resolve_targets

    if cfg.cpu_threads:
        torch.set_num_threads(int(cfg.cpu_threads))
    caso = CasoConfig(**OmegaConf.to_container(cfg.caso, resolve=True))  # checked before loading anything
    base = load_base(cfg.base, use_ema=bool(cfg.use_ema), device=cfg.device)
    info = base.dataset_info
    classifier, clf_meta = load_attribute_classifier(cfg.classifier, info, device=cfg.device)
    names, targets = resolve_targets(
        OmegaConf.to_container(cfg.attribute.names) if cfg.attribute.names is not None else None,
        OmegaConf.to_container(cfg.attribute.targets) if cfg.attribute.targets is not None else None,
        clf_meta["class_names"],
    )
    classes = OmegaConf.to_container(cfg.data.classes) if cfg.data.classes is not None else None
    ds = build_dataset(info["name"], split=cfg.data.split, image_size=int(info["image_size"]))
    images, _ = images_and_labels(ds, classes, cfg.data.limit)
    out = Path(cfg.out or HydraConfig.get().runtime.output_dir)
    log.info("CASO: %d embeddings %s -> classes %s of %s on %d %s images; base %s", len(names), names,
             targets, clf_meta["name"], len(images), info["name"], base.path)

    t_lo, t_hi = caso.t_min, caso.t_max
    if caso.timestep == "released":
        t_lo = t_hi = released_train_time(base.process)

    def probe(emb):
        return one_step_probability(base.model, base.process, base.prediction, classifier, images, emb,
                                    caso.guidance_scale, t_lo, t_hi, base.autoencoder)

    net = EmbeddingDiT(base.model)
    init = make_embeddings(caso.slot, net.label_table(), net.null_class, names, targets).to(cfg.device)
    before = probe(init)
    meta = {"base": str(base.path), "base_step": base.step, "classifier": clf_meta, "attribute": names,
            "data": {"dataset": info["name"], "split": cfg.data.split, "classes": classes,
                     "num_images": len(images)},
            "run_config": OmegaConf.to_container(cfg, resolve=True)}
    result = train_embeddings(base.model, base.process, base.prediction, classifier, images, names, targets,
                              caso, autoencoder=base.autoencoder, out_dir=out, meta=meta, device=cfg.device,
                              cpu_threads=cfg.cpu_threads)
    after = probe(result.embeddings)
    summary = {
        "embeddings": str(result.path),
        "names": names,
        "targets": targets,
        "slot": caso.slot,
        "timestep": caso.timestep if caso.timestep == "uniform" else f"released (t = {t_lo:.4f})",
        "steps": result.step,
        "train_seconds": round(result.seconds, 1),
        "num_images": len(images),
        "p_target_one_step_before": [round(p, 4) for p in before],
        "p_target_one_step_after": [round(p, 4) for p in after],
        "distance_from_null": [round(float(d), 4) for d in
                               (result.embeddings.vectors().detach() - init.vectors().detach()).norm(dim=1)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return float(sum(after) / len(after))


if __name__ == "__main__":
    main()
