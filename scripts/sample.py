#!/usr/bin/env python
"""Sample a trained checkpoint, save the images, and score them.

    python scripts/sample.py ckpt=<checkpoint dir> sampler=<name> steps=<n> guidance.scale=<w> \
        num_samples=<n> seed=<s>
    scripts/launch.sh --num_processes <gpus> scripts/sample.py ...      # shards indices over GPUs

Config: conf/sample.yaml. Loads the EMA weights and the run config (difftools.checkpoint.load; the
weights are checked against the sha256 recorded at save time unless ``verify_weights=false``),
draws image i from its own seed with label i mod num_classes (class-balanced; so the samples do
not depend on batch size or GPU count), and writes to ``out`` (default Hydra's run dir):

* ``images/NNNNNN.png`` (save.png), ``samples.npz`` with ``images`` uint8 [N, H, W, C], ``labels``,
  ``indices`` (save.npz), ``grid.png`` (save.grid): one class per column;
* ``metrics.json``: per feature space the distance to the training set (``fd_<classifier>``, or
  ``fid`` with Inception weights) with KID, n and protocol; class accuracy; NFE; sampler settings;
  seconds and images/s.

With several processes each draws the images i = rank, rank + N, ... and takes their features; the
main process gathers images and features in index order and scores them, so files and numbers are
those of one process (up to float round-off of batched kernels). Processes exchange their shares
through ``out`` (``.shard_<rank>.pt``, deleted after the merge), so ``out`` must be one folder that
every process sees (one host, or a shared file system).

The training set's statistics come from the dataset (computed once, cached), or from statistics
files (``metrics.stats_files=[ref.npz]``, written by ``scripts/fid.py --save-stats``, one per
feature space), in which case the dataset's files are not needed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from difftools.checkpoint import CheckpointError, load, resolve_checkpoint
from difftools.config import check_node
from difftools.device import keep_nvlink_multicast_off, lone_cpu_launch
from difftools.generate import SampleSpec, generate_uint8
from difftools.metrics.evaluate import (
    build_features,
    gather_shares,
    images_sha256,
    reference_for,
    score_features,
    shard_features,
)
from difftools.training.grid import save_grid
from samplers.schedule import SolverSchedule

# The types of conf/sample.yaml's keys: checked before any work, so `steps=abc` or
# `metrics.features=classifier` (a string, not a list) is a ConfigError naming key, value and type.
SAMPLE_SCHEMA = {
    "ckpt": str, "sampler": str, "steps": int, "schedule": str, "schedule_file": str | None,
    "sampler_opts": dict, "guidance": {"scale": float, "kind": str, "opts": dict},
    "num_samples": int, "seed": int, "class_label": int | None, "batch_size": int, "precision": str,
    "device": str | None, "out": str | None, "verify_weights": bool,
    "save": {"png": bool, "npz": bool, "grid": bool, "grid_size": int},
    "metrics": {"enabled": bool, "features": list[str], "reference_split": str, "kid": bool,
                "inception_weights": str | None, "allow_download": bool, "dataset": str | None,
                "image_size": int | None, "data_root": str | None, "stats_files": list[str]},
    "progress": bool,
}


def check_config(cfg: DictConfig) -> None:
    """Raise difftools.config.ConfigError on the first value of the wrong type (keys this schema
    does not know are left to Hydra, which already refuses unknown overrides)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    check_node(container, SAMPLE_SCHEMA, choices={"precision": ("bf16", "fp32")}, allow_unknown=True)


def shard_indices(num_samples: int, rank: int, world: int) -> list[int]:
    """Indices drawn by process ``rank`` of ``world`` (strided, so every shard is class-balanced)."""
    return list(range(rank, num_samples, world))


def write_png(folder: Path, indices: list[int], images: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in zip(indices, images.permute(0, 2, 3, 1).numpy(), strict=False):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")


def build_spec(cfg: DictConfig) -> SampleSpec:
    sampler, steps = str(cfg.sampler), int(cfg.steps)
    sampler_opts = OmegaConf.to_container(cfg.sampler_opts, resolve=True)
    if cfg.get("schedule_file"):  # a searched S³ schedule (scripts/search_schedule.py): usf on its own grid
        sched = SolverSchedule.load(cfg.schedule_file)
        sampler, steps, sampler_opts = "usf", sched.steps, {**sampler_opts, **sched.sample_kwargs()}
    return SampleSpec(
        sampler=sampler,
        steps=steps,
        schedule=str(cfg.schedule),
        guidance_scale=float(cfg.guidance.scale),
        guidance=str(cfg.guidance.kind),
        guidance_opts=OmegaConf.to_container(cfg.guidance.opts, resolve=True),
        seed=int(cfg.seed),
        class_label=cfg.class_label,
        sampler_opts=sampler_opts,
        precision=str(cfg.precision),
    ).validate()


def process_state(device: str | None = None) -> PartialState:
    """accelerate's process state (the process group under ``accelerate launch``): on the CPU when
    ``device`` says so or there is no GPU (accelerate would otherwise see one process per launch
    on a CPU-only host, each drawing every image)."""
    keep_nvlink_multicast_off()
    problem = lone_cpu_launch()
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def reference_of(cfg: DictConfig, loaded, images: torch.Tensor) -> tuple[str, int, str | None]:
    """(dataset, image size, data root) the samples are scored against (``metrics.*`` or the run's)."""
    m = cfg.metrics
    if m.dataset:
        return str(m.dataset), int(m.image_size or images.shape[-1]), m.data_root
    dataset, size, root = loaded.reference_dataset()
    return dataset, int(m.image_size or size), m.data_root or root


def merge_shards(out: Path, state: PartialState, labels) -> tuple[torch.Tensor, torch.Tensor | None, list,
                                                                 dict]:
    """On the main process: every process's shard file back in index order (and deleted): images,
    labels, each process's sampling seconds and, per metric, the gathered features."""
    parts = [torch.load(out / f".shard_{r}.pt", weights_only=True) for r in range(state.num_processes)]
    order = torch.cat([p["indices"] for p in parts]).argsort()
    images = torch.cat([p["images"] for p in parts])[order]
    labels = None if labels is None else torch.cat([p["labels"] for p in parts])[order]
    shares = {metric: gather_shares([p["shares"][metric] for p in parts], order.numpy())
              for metric in parts[0]["shares"]}
    for r in range(state.num_processes):
        (out / f".shard_{r}.pt").unlink()
    return images, labels, [p["seconds"] for p in parts], shares


def run(cfg: DictConfig, out: str | Path) -> dict | None:
    """Everything but Hydra: sample this process's shard and take its features, gather both on the
    main process, score, write."""
    check_config(cfg)  # wrong types: fail before any work
    spec = build_spec(cfg)  # unknown sampler, steps < 1: fail before any work
    ckpt = resolve_checkpoint(cfg.ckpt)
    if int(cfg.num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {cfg.num_samples}")
    state = process_state(cfg.device)
    device = torch.device(cfg.device) if cfg.device else state.device
    out = Path(out)
    loaded = load(ckpt, use_ema=True, device=device, verify=bool(cfg.get("verify_weights", True)))
    if cfg.get("schedule_file"):
        SolverSchedule.load(cfg.schedule_file).check_process(loaded.process)
    mine = shard_indices(int(cfg.num_samples), state.process_index, state.num_processes)
    t0 = time.perf_counter()
    images, labels, nfe = generate_uint8(
        loaded, mine, spec, int(cfg.batch_size), device, progress=bool(cfg.progress) and state.is_main_process
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if cfg.save.png:
        write_png(out / "images", mine, images)
    m = cfg.metrics
    extractors, shares = [], {}
    if m.enabled:
        dataset, size, root = reference_of(cfg, loaded, images)
        with state.main_process_first():  # a missing metric classifier is trained (and cached) once
            extractors = [build_features(str(f), dataset, size, device=device, root=root,
                                         weights=m.inception_weights, allow_download=bool(m.allow_download))
                          for f in m.features]
        # each process takes the features of its own images: the feature pass scales with the processes
        shares = {ext.metric: shard_features(images, labels, ext) for ext in extractors}
    if state.num_processes > 1:
        shard = {"indices": torch.tensor(mine, dtype=torch.long), "images": images, "labels": labels,
                 "seconds": seconds,
                 "shares": {k: {**v, "feats": torch.from_numpy(v["feats"])} for k, v in shares.items()}}
        torch.save(shard, out / f".shard_{state.process_index}.pt")
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    seconds_all = [seconds]
    if state.num_processes > 1:
        images, labels, seconds_all, shares = merge_shards(out, state, labels)
    n = len(images)
    files = ["metrics.json"]
    if cfg.save.npz:
        np.savez(
            out / "samples.npz",
            images=images.permute(0, 2, 3, 1).numpy(),
            labels=(labels if labels is not None else torch.full((n,), -1)).numpy(),
            indices=np.arange(n),
        )
        files.append("samples.npz")
    if cfg.save.grid:
        k, classes = min(int(cfg.save.grid_size), n), loaded.num_classes
        nrow = classes if classes and cfg.class_label is None and k >= classes else max(int(math.sqrt(k)), 1)
        save_grid(images[:k].float() / 127.5 - 1, out / "grid.png", nrow=nrow)
        files.append("grid.png")
    if cfg.save.png:
        files.append(f"images/ ({n} PNG)")
    sampling_seconds = max(seconds_all)  # processes run in parallel
    rec = {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "num_samples": n,
        "world_size": state.num_processes,
        "batch_size": int(cfg.batch_size),
        "device": str(device),
        "sampler": spec.as_dict(),
        "nfe": nfe,
        "sampling_seconds": sampling_seconds,
        "images_per_second": n / max(sampling_seconds, 1e-9),
        "class_accuracy": None,
        "metrics": {},
        "files": files,
    }
    if m.enabled:
        rec["reference"] = f"{dataset}/{m.reference_split}/{size}px"
        sha = images_sha256(images)
        for ext in extractors:
            ref = reference_for(ext, dataset, size, str(m.reference_split), root,
                                list(m.get("stats_files") or []), progress=bool(cfg.progress))
            s = score_features(shares[ext.metric], ext, ref, with_kid=bool(m.kid), name=str(out),
                               source_sha256=sha)
            rec["metrics"][s["metric"]] = s
    for metric, s in rec["metrics"].items():
        rec[metric] = s[metric]
        if s["class_accuracy"] is not None and rec["class_accuracy"] is None:
            rec["class_accuracy"] = s["class_accuracy"]
            rec["class_accuracy_classifier"] = s["protocol"].get("classifier")
    (out / "metrics.json").write_text(json.dumps(rec, indent=2, default=str))
    summary = {k: rec[k] for k in ("num_samples", "nfe", "images_per_second", "class_accuracy") if k in rec}
    summary.update({k: rec[k] for k in rec["metrics"]})
    print(json.dumps(summary))
    return rec


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    process_state(cfg.device)  # set up the process group (under accelerate launch) before broadcasting
    try:
        # every process writes into the main process's folder (Hydra's timestamp may differ per process)
        out = cfg.out or broadcast_object_list([HydraConfig.get().runtime.output_dir])[0]
        Path(out).mkdir(parents=True, exist_ok=True)
        run(cfg, out)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
