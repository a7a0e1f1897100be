"""data.train_subset: disjoint, class-balanced parts of a training split (difftools/data/subset.py),
e.g. the two halves a reward classifier and the judge that checks it are trained on."""

from __future__ import annotations

import pytest
import torch

from difftools.data import build_dataset
from difftools.data.subset import parse_part, part_indices


def test_halves_are_disjoint_class_balanced_cover_the_split_and_are_fixed():
    full = build_dataset("digits", split="train")
    halves = [build_dataset("digits", split="train", train_subset=f"{k}/2") for k in (0, 1)]
    assert len(halves[0]) + len(halves[1]) == len(full)
    # the same images, split without overlap: every full-split image is in exactly one half
    rows = {bytes(x.numpy()) for x in full.images}
    parts = [{bytes(x.numpy()) for x in h.images} for h in halves]
    assert parts[0] | parts[1] == rows
    idx = [part_indices(full.labels, k, 2) for k in (0, 1)]
    assert not set(idx[0].tolist()) & set(idx[1].tolist())
    for c in range(10):  # each class split in half (+-1)
        n0, n1 = int((halves[0].labels == c).sum()), int((halves[1].labels == c).sum())
        assert abs(n0 - n1) <= 1 and n0 + n1 == int((full.labels == c).sum())
    again = build_dataset("digits", split="train", train_subset="0/2")
    assert torch.equal(again.images, halves[0].images)  # a pure function of (labels, parts, seed)
    test = build_dataset("digits", split="test", train_subset="0/2")
    assert len(test) == len(build_dataset("digits", split="test"))  # other splits stay whole


def test_bad_subset_specs_name_the_value():
    for bad in ("2/2", "half", "1/0", "-1/2"):
        with pytest.raises(ValueError, match=rf"train_subset={bad!r}: expected 'k/n' with 0 <= k < n"):
            parse_part(bad)
    assert parse_part(" 1 / 3 ") == (1, 3)


def test_classifier_recipe_accepts_the_subset_on_the_command_line():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from difftools.data.base import REPO_ROOT

    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("classifier", overrides=["data.train_subset=1/2"])
    train = instantiate(cfg.data, split="train", random_flip=False)
    test = instantiate(cfg.data, split="test", random_flip=False)
    assert len(train) == len(build_dataset("digits", split="train", train_subset="1/2"))
    assert len(test) == len(build_dataset("digits", split="test"))
