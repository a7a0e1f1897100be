"""Fixed, disjoint parts of a split: ``build_dataset(..., subset="half0" | "half1" | "k/n", subset_seed=0)``.

Two models that must not share training images (a reward classifier and the judge that scores the
policy it trained, each on one half of CIFAR-10's training split) take ``subset="half0"`` and
``subset="half1"`` with the same ``subset_seed``. Part k of n is the k-th of n contiguous slices of
one permutation of the split's indices, so the parts are disjoint, cover the split, and differ in
size by at most one item. Within a part the items keep the split's order.

The permutation sorts the indices by ``sha256(f"{seed}:{index}")``. Unlike ``torch.randperm`` or a
NumPy generator, whose streams may change between library versions, the hash fixes every part for
good: a judge trained next year with other versions still sees exactly the other half.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch.utils.data import Dataset

from difftools.data.base import ArrayDataset, flip_key

_HALVES = {"half0": (0, 2), "half1": (1, 2)}
_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_subset(subset: str) -> tuple[int, int]:
    """``"half0"`` -> (0, 2), ``"half1"`` -> (1, 2), ``"k/n"`` -> (k, n) with 0 <= k < n."""
    key = str(subset).strip().lower()
    if key in _HALVES:
        return _HALVES[key]
    m = _PART.match(key)
    if m is None or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"data.subset={subset!r} is not a part of the split: use half0 or half1 (the two "
                         "halves), k/n (part k of n, 0 <= k < n, e.g. 2/5) or null (the whole split)")
    return int(m.group(1)), int(m.group(2))


def subset_indices(num_items: int, subset: str, seed: int = 0) -> torch.Tensor:
    """Sorted indices (long) of part ``subset`` (see :func:`parse_subset`) of ``num_items`` items."""
    part, parts = parse_subset(subset)
    if num_items < parts:
        raise ValueError(f"data.subset={subset!r}: the split has {num_items} items, fewer than {parts} parts")
    order = sorted(range(num_items), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    lo, hi = part * num_items // parts, (part + 1) * num_items // parts
    return torch.tensor(sorted(order[lo:hi]), dtype=torch.long)


class SubsetDataset(Dataset):
    """Items ``indices`` of ``dataset``, keeping its ``info`` and ``random_flip`` (``(index, flip)``
    keys are passed through with the index mapped)."""

    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices
        self.info = dataset.info
        self.random_flip = getattr(dataset, "random_flip", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        index, flip = flip_key(key)
        inner = int(self.indices[index])
        return self.dataset[inner if flip is None else (inner, flip)]

    def __repr__(self) -> str:
        return f"SubsetDataset({self.dataset!r}, n={len(self)})"


def take_subset(dataset, subset: str | None, seed: int = 0):
    """``dataset`` itself (``subset=None``), or part ``subset`` of it. An in-memory
    :class:`ArrayDataset` gives an ArrayDataset of the selected rows (so code reading ``.images``
    sees only them); other datasets a :class:`SubsetDataset`. Either has ``subset_indices``: the
    indices into the whole split."""
    if subset is None:
        return dataset
    indices = subset_indices(len(dataset), subset, seed)
    if isinstance(dataset, ArrayDataset):
        part = ArrayDataset(dataset.images[indices], dataset.labels[indices], dataset.info,
                            dataset.random_flip)
    else:
        part = SubsetDataset(dataset, indices)
    part.subset_indices = indices
    return part
