"""CIFAR-10 (Krizhevsky 2009): 32x32 RGB, 10 classes, 50,000 train / 10,000 test.

Layouts read (searched under each data root, then under <root>/cifar10):

* ``cifar10_jpeg_{train,test}.npz`` — arrays ``jpeg`` (all JPEG files concatenated), ``offsets``
  [N+1] and ``labels`` [N] (the copy in ../shared/data; see SOURCES.md). All images are decoded once
  with PIL into one uint8 array and cached in memory for the life of the process.
* ``cifar10_{train,test}.npz`` or ``{train,test}.npz`` — plain arrays ``images`` uint8 [N, 32, 32, 3]
  (or [N, 3, 32, 32]) and ``labels``.
* ``cifar-10-batches-py/`` — torchvision's python layout (``data_batch_1..5``, ``test_batch``),
  read with an unpickler that admits only numpy's array reconstruction (no arbitrary code).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from difftools.data.base import (
    ArrayDataset,
    CorruptDataError,
    DatasetInfo,
    data_roots,
    decode_errors,
    describe_bad_items,
    missing,
    nhwc_uint8_to_tensor,
    resize_uint8,
)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _read_npz(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    """The arrays ``keys`` of an npz file; CorruptDataError naming the file when it cannot be read."""
    try:
        with np.load(path) as data:
            missing_keys = [k for k in keys if k not in data.files]
            if missing_keys:
                raise CorruptDataError(f"{path}: no array(s) {missing_keys} in this npz (it holds "
                                       f"{data.files}); expected {list(keys)}")
            return [data[k] for k in keys]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        if isinstance(err, CorruptDataError):
            raise
        raise CorruptDataError(f"{path}: cannot read this npz ({type(err).__name__}: {err}); the file is "
                               "truncated or damaged: replace it (see ../shared/data/SOURCES.md)") from err


def _decode_jpeg_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode every JPEG of the npz; one CorruptDataError lists all items that fail (index, byte
    range, reason), since they are all decoded here anyway."""
    from PIL import Image

    blob, offsets, labels = _read_npz(path, ("jpeg", "offsets", "labels"))
    n = len(offsets) - 1
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    view = memoryview(blob)
    errors = decode_errors()

    def decode(lo: int, hi: int) -> list[tuple[int, str, BaseException]]:
        bad = []
        for i in range(lo, hi):
            try:
                with Image.open(io.BytesIO(view[offsets[i] : offsets[i + 1]])) as im:
                    rgb = np.asarray(im.convert("RGB"))
                if rgb.shape != (32, 32, 3):
                    raise ValueError(f"decoded to {rgb.shape[1]}x{rgb.shape[0]}, expected 32x32")
                out[i] = rgb
            except errors as err:
                bad.append((i, f"JPEG bytes {offsets[i]}..{offsets[i + 1]}", err))
        return bad

    # PIL releases the GIL while decoding, so threads scale with cores
    workers = max(1, min(8, os.cpu_count() or 1))
    bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        bad = [b for part in pool.map(decode, bounds[:-1], bounds[1:]) for b in part]
    if bad:
        raise CorruptDataError(describe_bad_items(
            f"cifar10 {path}", bad, n, "The file is damaged: replace it (see ../shared/data/SOURCES.md)."))
    return out, labels.astype(np.int64)


def _read_plain_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _read_npz(path, ("images", "labels"))
    if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: expected uint8 images [N, 32, 32, 3], got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's python batches that refuses every global except numpy array rebuilding."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch file")


def _read_python_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _locate(root, split: str):
    """First existing layout: (kind, path); raises FileNotFoundError listing every path tried."""
    tried = []
    for base in data_roots(root):
        for folder in (base / "cifar10", base):
            options = [
                ("jpeg", folder / f"cifar10_jpeg_{split}.npz"),
                ("npz", folder / f"cifar10_{split}.npz"),
                ("npz", folder / f"{split}.npz"),
                ("pickle", folder / "cifar-10-batches-py"),
            ]
            for kind, path in options:
                tried.append(path)
                if kind == "pickle" and path.is_dir() or kind != "pickle" and path.is_file():
                    return kind, path
    raise missing("cifar10", tried, f"{split} split")


def load_cifar_arrays(root=None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 32, 32, 3] and int64 labels [N]; decoded once per file and process."""
    if split not in ("train", "test"):
        raise ValueError(f"cifar10: unknown split {split!r}; choose train or test")
    kind, path = _locate(root, split)
    key = (str(path.resolve()), split, path.stat().st_mtime_ns)
    if key not in _CACHE:
        reader = {"jpeg": _decode_jpeg_npz, "npz": _read_plain_npz}.get(kind)
        _CACHE[key] = reader(path) if reader else _read_python_batches(path, split)
    return _CACHE[key]


def load_cifar10_dataset(
    root=None,
    split: str = "train",
    image_size: int | None = None,
    random_flip: bool = False,
    resize: str | None = None,
) -> ArrayDataset:
    images, labels = load_cifar_arrays(root, split)
    size = image_size or 32
    images = resize_uint8(images, size, resize or "bilinear")
    info = DatasetInfo("cifar10", 3, size, 10, CLASSES)
    return ArrayDataset(nhwc_uint8_to_tensor(images), torch.from_numpy(labels), info, random_flip)
