"""Reward models for online RL fine-tuning (:mod:`difftools.rl.nft`): ``reward(images, labels) -> [B]``.

Images are decoded samples in [-1, 1] ([B, C, H, W]); labels are the [B] class labels the samples
were drawn for (None for unconditional models). Rewards are black boxes to DiffusionNFT: they run
under ``no_grad`` and need no gradient. Nothing here downloads: classifiers come from a local
checkpoint or the cached metric classifier (trained on the spot from the local dataset if missing).

* :class:`ClassifierReward`: R = p(y | x) (or log p(y | x)) of the conditioning class under a
  difftools :class:`~difftools.models.classifier.Classifier`.
* :class:`BrightnessReward`: R = -mean pixel brightness, or -|brightness - target| (a cheap,
  deterministic image statistic, useful for tests and to watch a reward being hacked).

``evaluate(images, labels) -> (rewards, logs)`` also returns scalar diagnostics (the classifier's
accuracy); ``reward(images, labels)`` returns the rewards only.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from difftools.metrics.classifier import default_classifier
from difftools.metrics.features import load_classifier

REWARDS = ("classifier", "brightness")


def to_uint8_grid(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 levels an image file stores, back in [-1, 1]: the reward then
    sees exactly what a saved sample (and the class-accuracy metric) sees."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


class Reward(ABC):
    """Base class: ``evaluate(images, labels) -> (rewards [B] float32 on the CPU, logs)``."""

    name: str = "reward"

    @abstractmethod
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Rewards of ``images`` [B, C, H, W] in [-1, 1] drawn for ``labels`` [B]."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.evaluate(images, labels)[0]

    @staticmethod
    def _check(images: torch.Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"rewards take images [B, C, H, W] in [-1, 1], got shape {tuple(images.shape)}")


class ClassifierReward(Reward):
    """R(x, y) = p(y | x) (``log_prob=False``) or log p(y | x) under a clean-image classifier.

    Args:
        classifier: a :class:`~difftools.models.classifier.Classifier` (``net(x) -> logits``, x in
            [-1, 1]); put in eval mode, frozen.
        log_prob: reward log p(y | x) instead of the probability (unbounded below: one very wrong
            sample dominates the global std of the advantages).
        quantize: round images to 8 bits first (what a saved image and the accuracy metric see).
        device: where the classifier runs (default: its parameters' device).
    """

    name = "classifier"

    def __init__(self, classifier: nn.Module, log_prob: bool = False, quantize: bool = True, device=None):
        self.net = classifier.eval().requires_grad_(False)
        if device is not None:
            self.net.to(device)
        self.log_prob, self.quantize = bool(log_prob), bool(quantize)
        self.in_channels = getattr(classifier, "in_channels", None)
        self.image_size = getattr(classifier, "image_size", None)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kw) -> ClassifierReward:
        """A classifier checkpoint written by ``python train/classifier.py`` (``kind: classifier``)."""
        net, _ = load_classifier(path)
        return cls(net, **kw)

    @classmethod
    def from_default(cls, dataset: str, image_size: int | None = None, cache: str | Path | None = None,
                     root: str | None = None, **kw) -> ClassifierReward:
        """The dataset's cached metric classifier (:func:`difftools.metrics.classifier.default_classifier`;
        trained from the local dataset and cached if missing). NB: scoring the fine-tuned model's class
        accuracy with this same classifier then measures the reward itself, not an independent
        accuracy; pass a separately trained classifier to ``from_checkpoint`` for that."""
        features = default_classifier(dataset, image_size, root=root,
                                      cache=None if cache is None else Path(cache) / "classifiers")
        return cls(features.net, **kw)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        self._check(images)
        if labels is None:
            raise ValueError("ClassifierReward needs the class labels the samples were drawn for")
        if self.in_channels is not None and images.shape[1] != self.in_channels:
            raise ValueError(f"the classifier takes {self.in_channels}-channel images, got {images.shape[1]}")
        if self.image_size is not None and images.shape[-1] != self.image_size:
            raise ValueError(f"the classifier takes {self.image_size}px images, got {images.shape[-1]}px")
        device = next(self.net.parameters()).device
        x = images.to(device=device, dtype=torch.float32)
        x = to_uint8_grid(x) if self.quantize else x.clamp(-1, 1)
        # autocast off: the reward defines the RL signal, keep it in fp32 whatever the caller runs under
        cuda = device.type == "cuda"
        with torch.autocast("cuda", enabled=False) if cuda else contextlib.nullcontext():
            log_p = F.log_softmax(self.net(x).float(), dim=-1)
        labels = labels.to(device).long()
        chosen = log_p.gather(1, labels[:, None])[:, 0]
        rewards = chosen if self.log_prob else chosen.exp()
        accuracy = (log_p.argmax(-1) == labels).float().mean().item()
        return rewards.float().cpu(), {"accuracy": accuracy}


class BrightnessReward(Reward):
    """R(x) = -b(x) (``target=None``: darker is better) or -|b(x) - target|, with
    b(x) = mean over pixels of (x + 1) / 2 in [0, 1]. Labels are ignored."""

    name = "brightness"

    def __init__(self, target: float | None = None):
        if target is not None and not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"brightness target must be in [0, 1], got {target}")
        self.target = None if target is None else float(target)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        self._check(images)
        b = ((images.float().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)
        rewards = -b if self.target is None else -(b - self.target).abs()
        return rewards.cpu(), {"brightness": b.mean().item()}


def build_reward(name: str, dataset_info: dict | None = None, **opts) -> Reward:
    """A reward by name: ``classifier`` (opts: ``classifier`` = checkpoint dir, or None for the cached
    metric classifier of ``dataset_info['name']``; ``log_prob``, ``quantize``, ``cache``, ``root``) or
    ``brightness`` (opts: ``target``)."""
    if name == "classifier":
        path = opts.pop("classifier", None)
        cache, root = opts.pop("cache", None), opts.pop("root", None)
        if path:
            if not Path(path).exists():
                raise FileNotFoundError(f"reward classifier {path} does not exist; train one with "
                                        "`python train/classifier.py out=<dir>` (or set classifier=null for "
                                        "the cached metric classifier)")
            return ClassifierReward.from_checkpoint(path, **opts)
        info = dataset_info or {}
        if not info.get("name"):
            raise ValueError("reward=classifier with classifier=null needs the base checkpoint's dataset "
                             "name (dataset_info) to pick the cached metric classifier; pass a classifier "
                             "checkpoint")
        return ClassifierReward.from_default(info["name"], info.get("image_size"), cache=cache, root=root,
                                             **opts)
    if name == "brightness":
        return BrightnessReward(**opts)
    raise ValueError(f"unknown reward {name!r}; expected one of {REWARDS}")
