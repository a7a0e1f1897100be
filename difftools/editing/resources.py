"""Loading what an editing run needs (base DiT, attribute classifier, names -> classes), with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from difftools.checkpoint import CheckpointError
from difftools.checkpoint import load as load_checkpoint
from difftools.metrics.classifier import default_classifier
from difftools.metrics.features import load_classifier

__all__ = ["load_attribute_classifier", "load_base", "resolve_targets"]


def load_base(path, use_ema: bool = True, device="cpu"):
    """``difftools.load`` of a class-conditional DiT run / checkpoint; says how to make one if missing."""
    if path is None or not Path(str(path)).exists():
        raise CheckpointError(f"base DiT checkpoint not found: {path} (train one with `python train/dit.py`, "
                              "about 3.5 min on CPU for the digits default, and pass its run directory)")
    loaded = load_checkpoint(path, use_ema=use_ema, device=device)
    if getattr(loaded.model, "y_embedder", None) is None:
        raise ValueError(f"{loaded.path} is not a class-conditional DiT: CASO learns embeddings in the "
                         "label-embedding space, which an unconditional model does not have")
    if loaded.dataset_info is None:
        raise CheckpointError(f"{loaded.path} records no dataset_info: cannot tell which data it models")
    return loaded


def load_attribute_classifier(path, dataset_info: dict, device="cpu") -> tuple[nn.Module, dict]:
    """The classifier at ``path`` (a train/classifier.py checkpoint), or with ``path=None`` the cached metric
    classifier of the base's dataset (trained once if missing). Checks that it reads the base's images.

    Returns (classifier in eval mode, meta with ``name``, ``path``, ``class_names``, ``test_accuracy``).
    """
    if path is None:
        feats = default_classifier(dataset_info["name"], int(dataset_info["image_size"]), device=device)
        path = feats.path
    if not Path(str(path)).exists():
        raise CheckpointError(f"attribute classifier not found: {path} (train one with `python "
                              "train/classifier.py ...`; docs/editing.md has the stroke-thickness recipe)")
    clf, meta = load_classifier(path, device=device)
    shape = (int(dataset_info["channels"]), int(dataset_info["image_size"]))
    if (clf.in_channels, clf.image_size) != shape:
        raise ValueError(f"classifier {path} reads {clf.in_channels}x{clf.image_size}px images but the base "
                         f"model makes {shape[0]}x{shape[1]}px ones")
    info = meta.get("dataset_info") or {}
    names = list(info.get("class_names") or [str(k) for k in range(clf.num_classes)])
    return clf, {"name": meta["name"], "path": str(meta["path"]), "class_names": names,
                 "test_accuracy": meta.get("test_accuracy")}


def resolve_targets(names, targets, class_names: list[str]) -> tuple[list[str], list[int]]:
    """Embedding names and their classifier classes: all classes when ``names`` is None; names looked up
    in ``class_names`` when ``targets`` is None."""
    if names is None:
        return list(class_names), list(range(len(class_names)))
    names = [str(n) for n in names]
    if targets is None:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise ValueError(f"attribute names {unknown} are not classes of the classifier {class_names}; "
                             "pass attribute.targets=[...] to map them")
        return names, [class_names.index(n) for n in names]
    targets = [int(a) for a in targets]
    if len(targets) != len(names) or any(not 0 <= a < len(class_names) for a in targets):
        raise ValueError(f"attribute.targets {targets} must give one class in 0..{len(class_names) - 1} per "
                         f"name {names}")
    return names, targets
