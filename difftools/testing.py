"""Small random models for tests and the scripts' ``--smoke`` modes.

A smoke run exercises a script's whole code path in seconds on a CPU: the same
:class:`~difftools.loaded.Loaded` API, sampling, decoding and metrics as a real checkpoint, on a
DiT of a few ten thousand parameters shaped like a small dataset (digits by default: 1x16x16, ten
classes, embedded in scikit-learn, so no files are needed). Its samples are noise-like; only the code
path is being tested, never the numbers.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from difftools.checkpoint import save_checkpoint
from difftools.data import build_dataset
from difftools.loaded import Loaded
from difftools.models.dit import DiT
from difftools.process import make_process

#: the prediction type a smoke model declares for each process name of :func:`make_process`
PREDICTION_OF = {"flow": "flow", "rectified_flow": "flow", "vp": "eps", "vp_linear": "eps",
                 "vp_cosine": "eps", "edm": "x0", "ve": "x0"}


def tiny_dit(input_size: int = 16, in_channels: int = 1, num_classes: int = 10, *, patch_size: int = 4,
             hidden_size: int = 32, depth: int = 2, num_heads: int = 2, seed: int = 0, perturb: float = 0.0,
             **dit_kw) -> DiT:
    """A DiT small enough for a unit test (16 tokens, 2 blocks of width 32 by default) in eval mode.

    Initialised from ``seed`` without touching the global RNG. ``perturb`` > 0 adds N(0, perturb^2)
    to every parameter: DiT's adaLN-Zero initialisation makes a fresh model output exactly zero, so
    every solver would agree and the label would not matter; a perturbed model is a non-trivial
    function of x, t and y."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiT(input_size=input_size, in_channels=in_channels, patch_size=patch_size,
                    hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=num_classes,
                    **dit_kw)
        if perturb:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(perturb * torch.randn_like(p))
    return model.eval()


def _smoke_parts(process: str, dataset: str, image_size: int | None, perturb: float, seed: int,
                 prediction: str | None, dit_kw: dict):
    info = build_dataset(dataset, split="test", image_size=image_size).info
    model = tiny_dit(info.image_size, info.channels, info.num_classes, seed=seed, perturb=perturb, **dit_kw)
    if prediction is None:
        if process not in PREDICTION_OF:
            raise ValueError(f"no default prediction for process {process!r}; pass prediction=")
        prediction = PREDICTION_OF[process]
    return model, make_process(process), prediction, info


def smoke_run(process: str = "flow", *, dataset: str = "digits", image_size: int | None = None,
              perturb: float = 0.0, seed: int = 0, prediction: str | None = None, device="cpu",
              **dit_kw) -> Loaded:
    """A random :func:`tiny_dit` shaped like ``dataset`` as a loaded run (no checkpoint on disk):
    ``process`` by name (flow, vp, vp_cosine, edm), predicting flow / eps / x0 respectively."""
    model, proc, prediction, info = _smoke_parts(process, dataset, image_size, perturb, seed, prediction,
                                                 dit_kw)
    return Loaded(model.to(device), proc, prediction, dataset_info=asdict(info),
                  config={"data": {"name": info.name, "image_size": info.image_size}})


def save_smoke_checkpoint(path: str | os.PathLike, process: str = "flow", *, dataset: str = "digits",
                          image_size: int | None = None, perturb: float = 0.0, seed: int = 0,
                          prediction: str | None = None, **dit_kw) -> Path:
    """:func:`smoke_run`'s model written as a real checkpoint directory (for code paths that start
    from ``difftools.load``); returns the directory."""
    model, proc, prediction, info = _smoke_parts(process, dataset, image_size, perturb, seed, prediction,
                                                 dit_kw)
    return save_checkpoint(path, model, config={"data": {"name": info.name, "image_size": info.image_size}},
                           process=proc, prediction=prediction, dataset_info=info, update_latest=False)
