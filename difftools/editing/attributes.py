"""Derived binary attributes of labelled image datasets, to train attribute classifiers for CASO.

``stroke thickness``: the ink mass m(x) = mean pixel intensity (in [0, 1]) of an image compared with
the median mass of its own class on the TRAIN split:

    thick(x) = 1  if m(x) > median{ m(x') : x' in train, label(x') = label(x) }  else 0 ("thin").

Per-class medians make the attribute balanced inside every class (an 8 has more ink than a 1
whatever its pen), so a classifier must look at the strokes, not at the digit. The test split is
labelled with the train split's medians, so the labelling is one fixed function of (image, class).

:func:`attribute_dataset` has the signature of :func:`difftools.data.build_dataset`, so the
classifier recipe trains an attribute classifier without any change::

    python train/classifier.py data._target_=difftools.editing.attributes.attribute_dataset \\
        +data.attribute=thickness name=clf_digits16_thickness out=runs/classifier/digits16_thickness
"""

from __future__ import annotations

import torch

from difftools.data import build_dataset
from difftools.data.base import ArrayDataset, DatasetInfo

ATTRIBUTES = {"thickness": ("thin", "thick")}

__all__ = ["ATTRIBUTES", "attribute_dataset", "images_and_labels", "ink_mass", "thickness_labels"]


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
