"""CIFAR-10 (Krizhevsky 2009): 32x32 RGB, 10 classes, 50,000 train / 10,000 test.

Layouts read (searched under each data root, then under <root>/cifar10; docs/data.md has the
sources and checksums):

* ``cifar10_jpeg_{train,test}.npz`` — arrays ``jpeg`` (all JPEG files concatenated), ``offsets``
  [N+1] and ``labels`` [N] (a JPEG re-encoding of CIFAR-10, so pixels differ slightly from the
  original). All images are decoded once with PIL into one uint8 array and cached in memory for the
  life of the process.
* ``cifar10_{train,test}.npz`` or ``{train,test}.npz`` — plain arrays ``images`` uint8 [N, 32, 32, 3]
  (or [N, 3, 32, 32]) and ``labels``.
* ``cifar-10-batches-bin/`` — the official binary version (``data_batch_1..5.bin``,
  ``test_batch.bin``): records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32).
* ``cifar-10-batches-py/`` — the official python version (torchvision's download), read with an
  unpickler that admits only numpy's array reconstruction: any other global in the file is refused,
  so the file cannot run code.
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
    DATA_DOCS,
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
                               f"truncated or damaged: replace it (see {DATA_DOCS})") from err


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
            f"cifar10 {path}", bad, n, f"The file is damaged: replace it (see {DATA_DOCS})."))
    return out, labels.astype(np.int64)


def _read_plain_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _read_npz(path, ("images", "labels"))
    if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: expected uint8 images [N, 32, 32, 3], got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


class UnsafePickleError(pickle.UnpicklingError):
    """A CIFAR python batch names a global other than numpy's array rebuilding: it is not read."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's python batches that refuses every global except numpy array rebuilding,
    so a batch file cannot call any function (the same idea as ``torch.load(weights_only=True)``)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self.path}: refusing to unpickle {module}.{name} from a CIFAR batch file "
                                f"(it should hold only numpy arrays); replace it (see {DATA_DOCS})")


def _batch_files(folder: Path, split: str, suffix: str) -> list[Path]:
    """The official batch files of ``split`` in ``folder``; FileNotFoundError naming any absent one."""
    names = [f"data_batch_{i}{suffix}" for i in range(1, 6)] if split == "train" else [f"test_batch{suffix}"]
    paths = [folder / name for name in names]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"cifar10: {folder} lacks {', '.join(absent)} (the {split} split is "
            f"{', '.join(names)}); unpack the whole official archive there (see {DATA_DOCS})"
        )
    return paths


RECORD = 1 + 3 * 32 * 32  # one record of the binary version: label byte, then R, G, B planes


def _read_binary_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The official binary version: each file is a run of 3073-byte records (label 0..9, then the
    32x32 red, green and blue planes row by row)."""
    images, labels = [], []
    for path in _batch_files(folder, split, ".bin"):
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD:
            raise CorruptDataError(
                f"{path}: {raw.size} bytes is not a whole number of {RECORD}-byte records (1 label byte + "
                f"3072 pixel bytes); the file is truncated or damaged: replace it (see {DATA_DOCS})"
            )
        records = raw.reshape(-1, RECORD)
        bad = np.flatnonzero(records[:, 0] > 9)
        if bad.size:
            raise CorruptDataError(
                f"{path}: record {bad[0]} has label {records[bad[0], 0]} (labels are 0..9; {bad.size} "
                f"records are bad); the file is damaged or not CIFAR-10: replace it (see {DATA_DOCS})"
            )
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _read_python_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in _batch_files(folder, split, ""):
        try:
            with open(path, "rb") as f:
                batch = _NumpyOnlyUnpickler(f, path).load()
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
            raise CorruptDataError(f"{path}: cannot read this CIFAR batch ({type(err).__name__}: {err}); the "
                                   f"file is truncated or damaged: replace it (see {DATA_DOCS})") from err
        images.append(data.transpose(0, 2, 3, 1))
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
                ("binary", folder / "cifar-10-batches-bin"),
                ("pickle", folder / "cifar-10-batches-py"),
            ]
            for kind, path in options:
                tried.append(path)
                if path.is_dir() if kind in ("binary", "pickle") else path.is_file():
                    return kind, path
    raise missing("cifar10", tried, f"{split} split", "cifar10/", root)


def load_cifar_arrays(root=None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 32, 32, 3] and int64 labels [N]; decoded once per file and process."""
    if split not in ("train", "test"):
        raise ValueError(f"cifar10: unknown split {split!r}; choose train or test")
    kind, path = _locate(root, split)
    key = (str(path.resolve()), split, path.stat().st_mtime_ns)
    if key not in _CACHE:
        if kind in ("binary", "pickle"):
            reader = _read_binary_batches if kind == "binary" else _read_python_batches
            _CACHE[key] = reader(path, split)
        else:
            _CACHE[key] = (_decode_jpeg_npz if kind == "jpeg" else _read_plain_npz)(path)
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
