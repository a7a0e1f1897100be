"""Datasets yielding ``(x float32 [C, H, W] in [-1, 1], label)`` and a resumable, seeded loader.

``build_dataset(name, root=None, split="train", image_size=None, random_flip=False, **kw)`` with name
one of ``digits`` (embedded, no files), ``mnist``, ``fashion_mnist``, ``cifar10``, ``image_folder``,
``latents`` (cached autoencoder latents, :mod:`difftools.data.latents`). Each dataset has ``.info``
(:class:`DatasetInfo`). Files are looked up under ``root``, else $DIFFTOOLS_DATA, else
``../shared/data``; a missing file raises FileNotFoundError naming the paths tried.
"""

from __future__ import annotations

from difftools.data.base import ArrayDataset, CorruptDataError, DatasetInfo, data_roots
from difftools.data.loader import ResumableLoader, ResumableSampler, build_loader

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "image_folder", "latents")


def build_dataset(
    name: str,
    root=None,
    split: str = "train",
    image_size: int | None = None,
    random_flip: bool = False,
    verify: bool | None = None,
    train_subset: str | None = None,
    **kw,
):
    """Build dataset ``name``; extra keywords: ``resize`` (pad | nearest | bilinear | bicubic) for the
    array datasets, ``channels`` for image_folder, LatentDataset's own arguments for latents.

    ``train_subset="k/n"`` (Hydra: ``data.train_subset=0/2``) keeps part k of n disjoint,
    class-balanced parts of the train split, e.g. the two halves a reward classifier and its judge
    train on (:mod:`difftools.data.subset`); other splits are built whole.

    ``verify=True`` (Hydra: ``data.verify=true``) checks every item when the dataset is built and
    raises one :class:`~difftools.data.base.CorruptDataError` listing all bad files: image_folder
    decodes every image (otherwise each is decoded when first served), latents checks every shard's
    sha256 (its default). None: the dataset's default. digits, mnist, fashion_mnist and cifar10 read
    and decode every item when built, so they are always verified (a bad item is reported by index).
    """
    dataset = _build(name, root, split, image_size, random_flip, verify, **kw)
    if train_subset is not None and split == "train":
        from difftools.data.subset import take_part

        dataset = take_part(dataset, train_subset)
    return dataset


def _build(name, root, split, image_size, random_flip, verify, **kw):
    if verify is not None and name in ("image_folder", "latents"):
        kw["verify"] = bool(verify)
    if name == "digits":
        from difftools.data.digits import load_digits_dataset

        return load_digits_dataset(split, image_size, random_flip, **kw)
    if name in ("mnist", "fashion_mnist"):
        from difftools.data.idx import load_idx_dataset

        return load_idx_dataset(name, root, split, image_size, random_flip, **kw)
    if name == "cifar10":
        from difftools.data.cifar10 import load_cifar10_dataset

        return load_cifar10_dataset(root, split, image_size, random_flip, **kw)
    if name == "image_folder":
        from difftools.data.image_folder import ImageFolderDataset

        return ImageFolderDataset(root, image_size=image_size or 64, random_flip=random_flip, **kw)
    if name == "latents":
        from difftools.data.latents import LatentDataset

        return LatentDataset(root=root, split=split, image_size=image_size, random_flip=random_flip, **kw)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


__all__ = [
    "ArrayDataset",
    "CorruptDataError",
    "DATASETS",
    "DatasetInfo",
    "ResumableLoader",
    "ResumableSampler",
    "build_dataset",
    "build_loader",
    "data_roots",
]
