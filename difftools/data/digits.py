"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes): the embedded default, no files needed.

Pixels are 0..16 (4-bit); we map them to [0, 1] and upsample 8x8 -> ``image_size`` (default 16) by
bilinear interpolation. Bilinear rather than nearest: nearest gives 2x2 blocks whose hard edges a
small diffusion model renders as speckle, while the smooth strokes of the bilinear version come out
as recognisable digits in a sample grid after a few minutes of CPU training.
The train/test split is a fixed permutation (numpy seed 0): 1,437 train / 360 test (80/20).
"""

from __future__ import annotations

import numpy as np
import torch

from difftools.data.base import ArrayDataset, DatasetInfo, resize_float

SPLIT_SEED = 0
NUM_TEST = 360


def digits_split_indices(split: str) -> np.ndarray:
    """Indices of the fixed train / test / all split of the 1,797 digits."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(1797)
    if split == "train":
        return np.sort(perm[NUM_TEST:])
    if split == "test":
        return np.sort(perm[:NUM_TEST])
    if split == "all":
        return np.arange(1797)
    raise ValueError(f"digits: unknown split {split!r}; choose train, test or all")


def load_digits_dataset(
    split: str = "train", image_size: int | None = None, random_flip: bool = False, resize: str | None = None
) -> ArrayDataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, reads no network

    size = image_size or 16
    bunch = load_digits()
    idx = digits_split_indices(split)
    images = torch.from_numpy(bunch.images[idx].astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    images = resize_float(images, size, resize or "bilinear").clamp(0, 1).contiguous()
    info = DatasetInfo("digits", 1, size, 10, tuple(str(i) for i in range(10)))
    return ArrayDataset(images, torch.from_numpy(bunch.target[idx]), info, random_flip)
