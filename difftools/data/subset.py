"""Disjoint, class-balanced parts of a training split: ``build_dataset(..., train_subset="k/n")``.

Two models that must not see the same images -- a reward classifier and the judge that checks it,
or any held-out comparison -- train on parts ``0/2`` and ``1/2`` of one split. Part k of n holds,
for every class, the items whose position in a fixed seeded shuffle of that class is congruent to
k mod n: the parts are disjoint, cover the split, differ in size by at most one item per class, and
do not depend on anything but (labels, n, seed). Only the train split is divided; other splits are
built whole (a classifier is still tested on the full test split).
"""

from __future__ import annotations

import re

import torch

from difftools.data.base import ArrayDataset

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_part(spec) -> tuple[int, int]:
    """``"k/n"`` -> (k, n) with 0 <= k < n; anything else is a ValueError naming the value."""
    match = _SPEC.match(str(spec))
    k, n = (int(match.group(1)), int(match.group(2))) if match else (-1, 0)
    if not match or n < 1 or not 0 <= k < n:
        raise ValueError(
            f"train_subset={spec!r}: expected 'k/n' with 0 <= k < n, e.g. '0/2' and '1/2' for the "
            "two disjoint halves of the train split"
        )
    return k, n


def part_indices(labels: torch.Tensor, part: int, parts: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of part ``part`` of ``parts`` (module docstring)."""
    labels = torch.as_tensor(labels).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(seed)))
    chosen = []
    for c in torch.unique(labels):
        members = order[labels[order] == c]  # this class's items, in the shuffled order
        chosen.append(members[part::parts])
    return torch.cat(chosen).sort().values


def take_part(dataset, spec, seed: int = 0):
    """The ``spec`` = ``"k/n"`` part of an in-memory dataset, as a dataset of the same kind."""
    part, parts = parse_part(spec)
    if not isinstance(dataset, ArrayDataset):
        raise ValueError(
            f"train_subset is supported for the in-memory datasets (digits, mnist, fashion_mnist, "
            f"cifar10), not {type(dataset).__name__}"
        )
    idx = part_indices(dataset.labels, part, parts, seed)
    return ArrayDataset(dataset.images[idx], dataset.labels[idx], dataset.info, dataset.random_flip)
