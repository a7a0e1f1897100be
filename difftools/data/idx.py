"""MNIST and Fashion-MNIST from their original idx files (gzipped or not), read with gzip + numpy.

idx format (LeCun): big-endian header — images: magic 2051, count, rows, cols (16 bytes); labels:
magic 2049, count (8 bytes) — then raw uint8 data. Under the data root the files are looked up in
our layout (``mnist/``, ``fashion-mnist/``), torchvision's download layout (``MNIST/raw/``,
``FashionMNIST/raw/``) and the root itself, each ``.gz`` or uncompressed (docs/data.md). Copies
of the same data may be gzipped differently, so no checksum of a file is checked here (docs/data.md
lists the checksums of the decompressed originals); the header and sizes are.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from difftools.data.base import (
    DATA_DOCS,
    ArrayDataset,
    CorruptDataError,
    DatasetInfo,
    data_roots,
    missing,
    nhwc_uint8_to_tensor,
    resize_uint8,
)

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# folder names tried under the data root (ours first, then torchvision's raw layout)
FOLDERS = {
    "mnist": ("mnist", "MNIST/raw", "."),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "."),
}
PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one idx file (``.gz`` or plain) into a uint8 array of shape (count, *dims)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # a truncated or damaged .gz
        raise CorruptDataError(f"{path}: cannot decompress ({type(err).__name__}: {err}); the file is "
                               f"truncated or damaged: replace it (see {DATA_DOCS})") from err
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: idx magic number {magic}, expected {expected_magic} (corrupt or wrong file; "
            f"see {DATA_DOCS})"
        )
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim  # 16 bytes for images (3 dims), 8 for labels (1 dim)
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(dims)):
        raise ValueError(
            f"{path}: {arr.size} data bytes, header says {dims} (truncated file? see {DATA_DOCS})"
        )
    return arr.reshape(dims)


def _find(name: str, filename: str, root) -> Path:
    candidates = []
    for base in data_roots(root):
        for folder in FOLDERS[name]:
            for suffix in (".gz", ""):
                path = base / folder / (filename + suffix)
                candidates.append(path)
                if path.is_file():
                    return path
    raise missing(name, candidates, f"file {filename}(.gz)", f"{FOLDERS[name][0]}/", root)


def load_idx_dataset(
    name: str,
    root=None,
    split: str = "train",
    image_size: int | None = None,
    random_flip: bool = False,
    resize: str | None = None,
) -> ArrayDataset:
    """MNIST / Fashion-MNIST: 28x28 grey images; ``image_size`` pads (default) or resizes them."""
    if split not in PREFIX:
        raise ValueError(f"{name}: unknown split {split!r}; choose train or test")
    images = read_idx(_find(name, f"{PREFIX[split]}-images-idx3-ubyte", root), 2051)
    labels = read_idx(_find(name, f"{PREFIX[split]}-labels-idx1-ubyte", root), 2049)
    size = image_size or 28
    images = resize_uint8(images[..., None], size, resize or "pad")
    names = FASHION_CLASSES if name == "fashion_mnist" else tuple(str(i) for i in range(10))
    info = DatasetInfo(name, 1, size, 10, names)
    return ArrayDataset(
        nhwc_uint8_to_tensor(images), torch.from_numpy(labels.astype(np.int64)), info, random_flip
    )
