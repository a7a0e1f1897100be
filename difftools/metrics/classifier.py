"""Training, caching and scoring of the metric classifier (:mod:`difftools.models.classifier`).

* :func:`fit_classifier` trains on a toolkit dataset held as one tensor on the device (no loader
  overhead; a CIFAR-10 model reaches > 80 % test accuracy in well under a minute on one GPU):
  SGD with Nesterov momentum, linear warm-up then linear decay to zero, label smoothing, random
  translations (and flips where the data allows). Noise-conditional classifiers see
  x_t = alpha(t) x0 + sigma(t) eps with t ~ U(0, 1) on the given process.
* :func:`default_classifier` returns the cached classifier of a dataset (``<cache>/classifiers/``),
  training it first when it is missing, so metrics never depend on an outside download.
* :func:`class_accuracy` scores class-conditional samples: the fraction whose predicted class is
  the class they were sampled for.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from difftools.checkpoint import save_checkpoint
from difftools.data import build_dataset
from difftools.files import cache_dir
from difftools.images import float_to_uint8
from difftools.losses.classification import ClassificationLoss
from difftools.metrics.features import ClassifierFeatures, default_device, load_classifier
from difftools.models.classifier import Classifier
from difftools.training import Trainer, TrainerConfig
from difftools.training.classification import ClassifierObjective
from difftools.training.local import LocalAccelerator

# Presets by dataset: small enough to train on the CPU for the embedded default, and ~1 minute on
# a GPU for CIFAR-10. flip: horizontal flips are label-preserving for natural images, not digits.
PRESETS = {
    "digits": dict(widths=(16, 32, 64), depth=1, epochs=10, batch_size=64, lr=0.05, flip=False, shift=1),
    "mnist": dict(widths=(32, 64, 128), depth=1, epochs=4, batch_size=256, lr=0.1, flip=False, shift=2),
    "fashion_mnist": dict(
        widths=(32, 64, 128), depth=2, epochs=10, batch_size=256, lr=0.1, flip=True, shift=2
    ),
    "cifar10": dict(
        widths=(64, 128, 256, 512), depth=2, epochs=16, batch_size=512, lr=0.2, flip=True, shift=2
    ),
}
DEFAULT_PRESET = dict(widths=(64, 128, 256), depth=2, epochs=10, batch_size=256, lr=0.1, flip=True, shift=2)


def preset(dataset: str) -> dict:
    return dict(PRESETS.get(dataset, DEFAULT_PRESET))


def fit_options(p: dict) -> dict:
    """The :func:`fit_classifier` keywords of a preset (the rest of it sizes the model)."""
    return {k: p[k] for k in ("epochs", "batch_size", "lr", "flip", "shift")}


def dataset_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """(x uint8 [N, C, H, W], y long [N]) of a toolkit dataset (items in [-1, 1])."""
    images = getattr(ds, "images", None)
    if (
        isinstance(images, torch.Tensor)
        and images.dtype == torch.uint8
        and not getattr(ds, "random_flip", False)
    ):
        return images, ds.labels.long()  # ArrayDataset fast path: the stored pixels themselves
    loader = torch.utils.data.DataLoader(ds, batch_size=1000, shuffle=False, num_workers=0)
    xs, ys = [], []
    for x, y in loader:
        xs.append(float_to_uint8(x))
        ys.append(torch.as_tensor(y).long())
    return torch.cat(xs), torch.cat(ys)


@dataclass
class FitResult:
    test_accuracy: float
    train_seconds: float
    epochs: int
    images_per_second: float


@torch.no_grad()
def accuracy(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    device=None,
    batch_size: int = 1000,
    t: float | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on uint8 images x (at noise level t for conditional models)."""
    device = device or next(model.parameters()).device
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device).float() / 127.5 - 1
        correct += (model(xb, t).argmax(-1).cpu() == y[i : i + batch_size].cpu()).sum().item()
    return correct / max(len(x), 1)


def fit_classifier(
    model: Classifier,
    train_ds,
    test_ds=None,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    label_smoothing: float = 0.1,
    warmup: float = 0.15,
    flip: bool = False,
    shift: int = 2,
    process=None,
    seed: int = 0,
    device=None,
    log=print,
    run_dir: str | Path | None = None,
    resume: str | None = None,
    ckpt_every: int = 0,
    run_config: dict | None = None,
) -> FitResult:
    """Train ``model`` in place on the training engine and return its test accuracy (on clean
    images, t = 0).

    The recipe (:class:`~difftools.training.classification.ClassifierObjective`): SGD with Nesterov
    momentum, no weight decay on 1-D parameters, linear warm-up over a ``warmup`` fraction of the
    steps then linear decay to zero, label smoothing, flips / shifts, noise levels on ``process``.
    It runs in this process only (:class:`~difftools.training.local.LocalAccelerator`), also inside a
    distributed run. ``run_dir`` (None: nothing is written) keeps checkpoints every ``ckpt_every``
    steps and at the end, ``metrics.jsonl`` and the run lock; ``resume`` (a checkpoint, or ``"auto"``
    for the run directory's latest) continues such a run exactly. ``run_config`` goes into each
    checkpoint's config.yaml."""
    device = default_device(device)
    cuda = device.type == "cuda"
    images, labels = dataset_tensors(train_ds)
    if cuda:
        model.to(memory_format=torch.channels_last)
    loss_fn = ClassificationLoss(label_smoothing, flip, shift, process, channels_last=cuda)
    objective = ClassifierObjective(model, loss_fn, images, labels, batch_size=batch_size, seed=seed,
                                    process=process, dataset_info=getattr(train_ds, "info", None),
                                    epochs=epochs, log=log)
    total = epochs * objective.steps_per_epoch
    # linear warm-up, then linear decay to zero (the one-cycle shape of Smith & Topin, arXiv 1708.07120)
    config = TrainerConfig(
        batch_size=min(batch_size, len(images)), max_steps=total, optimizer="sgd", lr=lr, momentum=momentum,
        nesterov=True, weight_decay=weight_decay, no_decay_1d=True, warmup_steps=max(int(warmup * total), 1),
        lr_decay="linear", grad_clip=0.0, ema_decay=0.0, seed=seed, log_every=objective.steps_per_epoch,
        ckpt_every=ckpt_every, sample_every=0, progress=False, resume=resume,
        device="cpu" if device.type == "cpu" else "auto")
    result = Trainer(objective, config, run_dir, run_config=run_config,
                     accelerator=LocalAccelerator(device)).train()
    model.eval()
    acc = float("nan")
    if test_ds is not None:
        x_test, y_test = dataset_tensors(test_ds)
        acc = accuracy(model, x_test, y_test, device)
    seen = len(result.losses) * config.batch_size  # the steps of this call (a resumed run did the rest)
    return FitResult(test_accuracy=acc, train_seconds=result.seconds, epochs=epochs,
                     images_per_second=seen / max(result.seconds, 1e-9))


def save_classifier(
    path: str | Path,
    model: Classifier,
    dataset_info,
    result: FitResult,
    config: dict | None = None,
    process=None,
) -> Path:
    """Write the classifier in the project's checkpoint format (``kind: classifier``)."""
    full = dict(config or {})
    full["result"] = {
        "test_accuracy": result.test_accuracy,
        "train_seconds": result.train_seconds,
        "epochs": result.epochs,
        "images_per_second": result.images_per_second,
    }
    return save_checkpoint(
        path,
        model.cpu(),
        config=full,
        kind="classifier",
        process=process,
        dataset_info=dataset_info,
        update_latest=False,
    )


def default_classifier_path(dataset: str, image_size: int, cache: str | Path | None = None) -> Path:
    root = Path(cache) if cache is not None else cache_dir() / "classifiers"
    return root / f"{dataset}_{image_size}px"


def default_classifier(
    dataset: str = "digits",
    image_size: int | None = None,
    root: str | None = None,
    cache: str | Path | None = None,
    device=None,
    log=print,
) -> ClassifierFeatures:
    """The cached metric classifier of ``dataset`` at ``image_size``; trained (preset settings,
    seed 0) and saved there first if it does not exist yet. With ``image_size`` given, a cached
    classifier is loaded without building the dataset (its files need not be present)."""
    train = None
    if image_size is None:  # the dataset's own default size is known only from the dataset
        train = build_dataset(dataset, root=root, split="train")
        image_size = train.info.image_size
    size = int(image_size)
    path = default_classifier_path(dataset, size, cache)
    if not (path / "config.yaml").is_file():
        if train is None:
            train = build_dataset(dataset, root=root, split="train", image_size=size)
        cfg = preset(dataset)
        info = train.info
        model = Classifier(
            info.channels, size, info.num_classes, cfg["widths"], cfg["depth"], name=f"clf_{dataset}{size}"
        )
        test = build_dataset(dataset, root=root, split="test", image_size=size)
        if log is not None:
            log(f"training the metric classifier for {dataset} ({size}px) -> {path}")
        res = fit_classifier(model, train, test, **fit_options(cfg), device=device, log=None)
        if log is not None:
            log(f"metric classifier: test accuracy {res.test_accuracy:.4f} in {res.train_seconds:.1f} s")
        # a private name first, then one rename: concurrent processes may train the same classifier;
        # the first to finish wins and the others discard theirs
        mine = path.with_name(f".{path.name}.{os.getpid()}")
        save_classifier(
            mine, model, info, res, config={"data": {"name": dataset, "image_size": size}, "train": cfg}
        )
        try:
            os.rename(mine, path)
        except OSError:
            shutil.rmtree(mine, ignore_errors=True)
    model, meta = load_classifier(path)
    return ClassifierFeatures(
        model, name=meta["name"], device=device, sha256=meta["weights_sha256"], path=str(path)
    )


@torch.no_grad()
def class_accuracy(
    extractor: ClassifierFeatures, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Fraction of uint8 images [N, C, H, W] whose predicted class equals ``labels``."""
    correct = 0
    for i in range(0, len(images), batch_size):
        pred = extractor.logits(images[i : i + batch_size]).argmax(-1)
        correct += (pred == labels[i : i + batch_size].cpu()).sum().item()
    return correct / max(len(images), 1)
