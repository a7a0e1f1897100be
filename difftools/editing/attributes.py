"""Derived binary attributes of labelled image datasets, to train attribute classifiers for CASO.

``stroke thickness``: the ink mass m(x) = mean pixel intensity (in [0, 1]) of an image compared with
the median mass of its own class on the TRAIN split:

    thick(x) = 1  if m(x) > median{ m(x') : x' in train, label(x') = label(x) }  else 0 ("thin").

Per-class medians make the attribute balanced inside every class (an 8 has more ink than a 1
whatever its pen), so a classifier must look at the strokes, not at the digit. The test split is
labelled with the train split's medians, so the labelling is one fixed function of (image, class).

``slant``: the shear of the ink distribution, from the image's second moments (the quantity the
classic moment deskewing of MNIST removes). With intensities I(u, v) in [0, 1] at column u and row
v (rows grow downward), centroid (u_c, v_c) and central moments mu_11 = sum I (u - u_c)(v - v_c),
mu_02 = sum I (v - v_c)^2:

    slant(x) = -mu_11 / mu_02          (columns moved per row going up: > 0 leans right, "/")

    right(x) = 1  if slant(x) > median{ slant(x') : x' in half A, label(x') = label(x) }  else 0 ("left")

It needs no learning, so it serves as the *judge* of slant edits, independent of any classifier.
The train split is cut into two fixed halves (:func:`split_halves`, seed 0): the per-class medians
and the attribute classifier come from half A ("train"); half B ("heldout") and the test split are
never seen by it. Splits of ``attribute_dataset(..., attribute="slant")``: ``train`` = half A,
``heldout`` = half B, ``test`` = the dataset's test split.

:func:`attribute_dataset` has the signature of :func:`difftools.data.build_dataset`, so the
classifier recipe trains an attribute classifier without any change::

    python train/classifier.py data._target_=difftools.editing.attributes.attribute_dataset \\
        +data.attribute=thickness name=clf_digits16_thickness out=runs/classifier/digits16_thickness
"""

from __future__ import annotations

import torch

from difftools.data import build_dataset
from difftools.data.base import ArrayDataset, DatasetInfo

ATTRIBUTES = {"thickness": ("thin", "thick"), "slant": ("left", "right")}
SLANT_SPLITS = ("train", "heldout", "test")

__all__ = ["ATTRIBUTES", "attribute_dataset", "class_medians", "images_and_labels", "ink_mass", "slant",
           "slant_judge", "slant_splits", "split_halves", "thickness_labels"]


def images_and_labels(ds, classes=None, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a toolkit dataset as (x float32 [N, C, H, W] in [-1, 1], labels [N]), optionally only
    those whose label is in ``classes`` and at most the first ``limit`` of them."""
    loader = torch.utils.data.DataLoader(ds, batch_size=1000, shuffle=False, num_workers=0)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.float())
        ys.append(torch.as_tensor(y).long())
    x, y = torch.cat(xs), torch.cat(ys)
    if classes is not None:
        keep = torch.isin(y, torch.as_tensor(list(classes), dtype=torch.long))
        if not bool(keep.any()):
            raise ValueError(f"no images of classes {list(classes)} in {getattr(ds, 'info', ds)}")
        x, y = x[keep], y[keep]
    if limit is not None:
        x, y = x[: int(limit)], y[: int(limit)]
    return x, y


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """Mean intensity per image in [0, 1] of images given in [-1, 1] ([N, C, H, W] -> [N])."""
    return ((images.float() + 1) / 2).flatten(1).mean(1)


def slant(images: torch.Tensor, eps: float = 1e-8, threshold: float | None = None) -> torch.Tensor:
    """-mu_11 / mu_02 of the intensity (images in [-1, 1], [N, 1, H, W] -> [N]); see the module
    docstring. An image without ink has slant 0.

    ``threshold`` (in [0, 1]): count only pixels brighter than it, each with weight 1. A faint uniform
    background adds to mu_02 but not to mu_11 and so pulls the plain measure toward 0; the binarised
    one ignores it (a robustness check of the judge)."""
    ink = ((images.float() + 1) / 2).clamp(0, 1)
    if threshold is not None:
        ink = (ink > threshold).float()
    ink = ink.sum(1)  # [N, H, W], channels summed
    _, h, w = ink.shape
    v = torch.arange(h, dtype=ink.dtype, device=ink.device)[None, :, None]
    u = torch.arange(w, dtype=ink.dtype, device=ink.device)[None, None, :]
    mass = ink.sum((1, 2)).clamp_min(eps)
    vc = (ink * v).sum((1, 2)) / mass
    uc = (ink * u).sum((1, 2)) / mass
    dv, du = v - vc[:, None, None], u - uc[:, None, None]
    mu11 = (ink * du * dv).sum((1, 2))
    mu02 = (ink * dv * dv).sum((1, 2))
    return -mu11 / mu02.clamp_min(eps)


def split_halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint fixed halves (A, B) of range(n) from ``randperm(n)`` seeded ``seed``, each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2].sort().values, perm[n // 2:].sort().values


def slant_judge(images: torch.Tensor, labels: torch.Tensor, medians: torch.Tensor,
                threshold: float | None = None) -> torch.Tensor:
    """1 ("right") where the slant exceeds the median of the image's class (``medians`` from half A),
    else 0 ("left"): the judge of slant edits (no learning). ``threshold``: see :func:`slant`."""
    return (slant(images, threshold=threshold) > medians.to(images.device)[labels]).long()


def _as_unit(ds: ArrayDataset) -> torch.Tensor:
    """A toolkit array dataset's images in [0, 1] (uint8 0..255 or float 0..1 storage)."""
    images = ds.images
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def class_medians(mass: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Median ink mass of each class [num_classes]; a class without images is an error."""
    med = torch.empty(num_classes)
    for k in range(num_classes):
        sel = mass[labels == k]
        if sel.numel() == 0:
            raise ValueError(f"class {k} has no images: cannot define its median ink mass")
        med[k] = sel.median()
    return med


def thickness_labels(mass: torch.Tensor, labels: torch.Tensor, medians: torch.Tensor) -> torch.Tensor:
    """1 (thick) where the mass exceeds the median of the image's class, else 0 (thin)."""
    return (mass > medians[labels]).long()


def attribute_dataset(name: str = "digits", root=None, split: str = "train", image_size: int | None = None,
                      random_flip: bool = False, attribute: str = "thickness", **kw) -> ArrayDataset:
    """The images of dataset ``name`` labelled with a derived binary ``attribute`` (see module docstring).

    ``info.name`` becomes ``<name>_<attribute>``, ``info.class_names`` the attribute's value names.
    """
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown derived attribute {attribute!r}; choose one of {sorted(ATTRIBUTES)}")
    if attribute == "slant":
        return _slant_dataset(name, root, split, image_size, random_flip, **kw)
    train = build_dataset(name, root=root, split="train", image_size=image_size, **kw)
    ds = train if split == "train" else build_dataset(name, root=root, split=split, image_size=image_size,
                                                      **kw)
    if not isinstance(ds, ArrayDataset) or not isinstance(train, ArrayDataset):
        raise TypeError(f"derived attributes need an in-memory labelled dataset; {name!r} is "
                        f"{type(ds).__name__}")
    medians = class_medians(_as_unit(train).flatten(1).mean(1), train.labels, train.info.num_classes)
    labels = thickness_labels(_as_unit(ds).flatten(1).mean(1), ds.labels, medians)
    info = DatasetInfo(f"{ds.info.name}_{attribute}", ds.info.channels, ds.info.image_size,
                       len(ATTRIBUTES[attribute]), ATTRIBUTES[attribute])
    out = ArrayDataset(ds.images, labels, info, random_flip)
    out.source_labels = ds.labels  # the original classes, for per-class reporting
    return out


def slant_splits(name: str = "mnist", root=None, image_size: int | None = None, random_flip: bool = False,
                 **kw) -> dict[str, ArrayDataset]:
    """The three slant splits (``train`` = half A, ``heldout`` = half B, ``test``) of dataset ``name``,
    labelled by :func:`slant_judge` with the per-class medians of half A. Each dataset also carries
    ``source_labels`` (the classes) and ``medians`` (the judge's thresholds)."""
    train = build_dataset(name, root=root, split="train", image_size=image_size, **kw)
    test = build_dataset(name, root=root, split="test", image_size=image_size, **kw)
    if not isinstance(train, ArrayDataset) or not isinstance(test, ArrayDataset):
        raise TypeError(f"derived attributes need an in-memory labelled dataset; {name!r} is "
                        f"{type(train).__name__}")
    half_a, half_b = split_halves(len(train))
    medians = class_medians(slant(_as_unit(train)[half_a] * 2 - 1), train.labels[half_a],
                            train.info.num_classes)
    info = DatasetInfo(f"{train.info.name}_slant", train.info.channels, train.info.image_size, 2,
                       ATTRIBUTES["slant"])
    parts = {"train": (train, half_a), "heldout": (train, half_b), "test": (test, None)}
    out = {}
    for split, (ds, keep) in parts.items():
        images = ds.images if keep is None else ds.images[keep]
        classes = ds.labels if keep is None else ds.labels[keep]
        unit = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        out[split] = ArrayDataset(images, slant_judge(unit * 2 - 1, classes, medians), info, random_flip)
        out[split].source_labels = classes  # the original classes, for per-class reporting and the judge
        out[split].medians = medians        # per-class median slant of half A (the judge's thresholds)
    return out


def _slant_dataset(name, root, split, image_size, random_flip, **kw) -> ArrayDataset:
    if split not in SLANT_SPLITS:
        raise ValueError(f"slant attribute splits are {SLANT_SPLITS} (half A, half B of train, test), got "
                         f"{split!r}")
    return slant_splits(name, root, image_size, random_flip, **kw)[split]
