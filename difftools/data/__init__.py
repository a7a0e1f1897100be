"""Datasets yielding ``(x float32 [C, H, W] in [-1, 1], label)`` and a resumable, seeded loader.

``build_dataset(name, root=None, split="train", image_size=None, random_flip=False, subset=None, **kw)``
with name one of ``digits`` (embedded, no files), ``mnist``, ``fashion_mnist``, ``cifar10``,
``image_folder``, ``latents`` (cached autoencoder latents, :mod:`difftools.data.latents`); ``subset``
takes a fixed part of the split (:mod:`difftools.data.subset`). Each dataset has ``.info``
(:class:`DatasetInfo`). Files are looked up under ``root`` (Hydra: ``data.root=``), else
$DIFFTOOLS_DATA; docs/data.md lists the layout, the files and where to get them. A missing file
raises FileNotFoundError naming the paths tried.
"""

from __future__ import annotations

from difftools.data.base import ArrayDataset, CorruptDataError, DatasetInfo, data_roots
from difftools.data.cifar10 import load_cifar10_dataset
from difftools.data.digits import load_digits_dataset
from difftools.data.idx import load_idx_dataset
from difftools.data.image_folder import ImageFolderDataset
from difftools.data.latents import LatentDataset
from difftools.data.loader import ResumableLoader, ResumableSampler, build_loader
from difftools.data.subset import SubsetDataset, subset_indices, take_subset

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "image_folder", "latents")


def build_dataset(
    name: str,
    root=None,
    split: str = "train",
    image_size: int | None = None,
    random_flip: bool = False,
    verify: bool | None = None,
    subset: str | None = None,
    subset_seed: int = 0,
    **kw,
):
    """Build dataset ``name``; extra keywords: ``resize`` (pad | nearest | bilinear | bicubic) for the
    array datasets, ``channels`` for image_folder, LatentDataset's own arguments for latents.

    ``verify=True`` (Hydra: ``data.verify=true``) checks every item when the dataset is built and
    raises one :class:`~difftools.data.base.CorruptDataError` listing all bad files: image_folder
    decodes every image (otherwise each is decoded when first served), latents checks every shard's
    sha256 (its default). None: the dataset's default. digits, mnist, fashion_mnist and cifar10 read
    and decode every item when built, so they are always verified (a bad item is reported by index).

    ``subset`` (Hydra: ``data.subset=half0``): ``half0`` / ``half1`` or ``k/n`` keeps only that part of
    the split, fixed by ``subset_seed``; parts with the same seed are disjoint and together cover the
    split (:mod:`difftools.data.subset`). None: the whole split.
    """
    if subset is not None:
        whole = build_dataset(name, root, split, image_size, random_flip, verify, **kw)
        return take_subset(whole, subset, int(subset_seed))
    if verify is not None and name in ("image_folder", "latents"):
        kw["verify"] = bool(verify)
    if name == "digits":
        return load_digits_dataset(split, image_size, random_flip, **kw)
    if name in ("mnist", "fashion_mnist"):
        return load_idx_dataset(name, root, split, image_size, random_flip, **kw)
    if name == "cifar10":
        return load_cifar10_dataset(root, split, image_size, random_flip, **kw)
    if name == "image_folder":
        return ImageFolderDataset(root, image_size=image_size or 64, random_flip=random_flip, **kw)
    if name == "latents":
        return LatentDataset(root=root, split=split, image_size=image_size, random_flip=random_flip, **kw)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


__all__ = [
    "ArrayDataset",
    "CorruptDataError",
    "DATASETS",
    "DatasetInfo",
    "ResumableLoader",
    "ResumableSampler",
    "SubsetDataset",
    "build_dataset",
    "build_loader",
    "data_roots",
    "subset_indices",
    "take_subset",
]
