"""Image sets as the metrics read them: every source becomes uint8 batches [B, C, H, W].

An image source (``ImageSource``) is any of

* a folder of images (searched recursively like clean-fid; grey images stay one channel, others
  become RGB as with PIL ``convert('RGB')``); all of one size,
* an ``.npz`` file holding uint8 images ``[N,H,W,C]``, ``[N,C,H,W]`` or ``[N,H,W]`` (key ``images``,
  ``x``, ``arr_0`` or its only array),
* an in-memory uint8 array/tensor, or a float tensor in [-1, 1] (quantised exactly as a PNG
  writer would, :func:`difftools.images.float_to_uint8`, so in-memory and saved samples give the
  same number),
* an iterable (e.g. a generator) of such batches, or of ``(images, labels)`` pairs.

Statistics (:mod:`difftools.metrics.stats`) stand in for an image set wherever a distance is taken.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from glob import glob
from pathlib import Path

import numpy as np
import torch
from cleanfid.utils import EXTENSIONS
from PIL import Image
from torch.utils.data import DataLoader

from difftools.data.base import CorruptDataError, decode_errors
from difftools.images import float_to_uint8


def as_uint8_batch(x) -> torch.Tensor:
    """One batch (array or tensor) -> uint8 tensor [B, C, H, W]."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image array or tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"images must be [N,H,W], [N,C,H,W] or [N,H,W,C], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"integer images must be uint8, got {x.dtype}")
        x = float_to_uint8(x)
    return x.contiguous()


def list_image_files(folder: str | Path) -> list[str]:
    """Image files under ``folder``, recursively, sorted (clean-fid's order and extensions)."""
    return sorted(
        f for ext in EXTENSIONS for f in glob(os.path.join(str(folder), f"**/*.{ext}"), recursive=True)
    )


def read_image(path: str) -> np.ndarray:
    """HWC uint8; grey stays one channel, every other mode becomes RGB."""
    if path.endswith(".npy"):
        return np.load(path)
    with Image.open(path) as img:
        img = img if img.mode == "L" else img.convert("RGB")
        arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    if len({a.shape[-1] for a in arrays}) > 1:  # grey and colour mixed: colour wins
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    return as_uint8_batch(np.stack(arrays))


def load_npz_images(path: str | Path) -> np.ndarray:
    with np.load(path) as z:
        keys = list(z.keys())
        for k in ("images", "x", "arr_0"):
            if k in keys:
                return z[k]
        if len(keys) == 1:
            return z[keys[0]]
    raise KeyError(f"{path}: no image array found (keys {keys}); store images under 'images'")


def _read_named(path: str) -> np.ndarray:
    """read_image, with the file named when it cannot be decoded."""
    try:
        return read_image(path)
    except decode_errors() as err:
        raise CorruptDataError(f"{path}: cannot decode ({type(err).__name__}: {err})") from err


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header (or the .npy shape), without decoding the pixels."""
    if path.endswith(".npy"):
        shape = np.load(path, mmap_mode="r").shape
        return int(shape[1]), int(shape[0])
    with Image.open(path) as img:
        return img.size


def mixed_sizes_error(folder: Path, files: list[str], show: int = 3) -> ValueError:
    """The error for a folder whose images differ in size: every size found, with its count and
    example files (most common size first)."""
    by_size: dict[tuple[int, int], list[str]] = {}
    for f in files:
        by_size.setdefault(_image_size(f), []).append(f)
    parts = []
    for (w, h), group in sorted(by_size.items(), key=lambda kv: -len(kv[1])):
        examples = ", ".join(os.path.relpath(f, folder) for f in group[:show])
        more = ", ..." if len(group) > show else ""
        parts.append(f"  {w}x{h}: {len(group)} file{'s' if len(group) != 1 else ''} ({examples}{more})")
    return ValueError(
        f"{folder}: images of {len(by_size)} different sizes:\n" + "\n".join(parts) + "\n"
        "One Fréchet distance compares images of one size: remove the odd ones (e.g. a sample grid saved "
        "next to the samples) or resize them all."
    )


def iter_images(source, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Yield uint8 batches [B, C, H, W] from an image source. A folder must hold images of one size
    (ValueError listing the sizes and example files otherwise)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = list_image_files(path)
            if not files:
                raise FileNotFoundError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {path}")
            size = None
            for i in range(0, len(files), batch_size):
                arrays = [_read_named(f) for f in files[i : i + batch_size]]
                size = size or arrays[0].shape[:2]
                if any(a.shape[:2] != size for a in arrays):  # only then read every header, for the message
                    raise mixed_sizes_error(path, files)
                yield _stack(arrays)
            return
        if path.suffix == ".npz" and path.is_file():
            source = load_npz_images(path)
        else:
            raise FileNotFoundError(f"image source {path} is neither a folder nor an .npz file")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        for i in range(0, len(source), batch_size):
            yield as_uint8_batch(source[i : i + batch_size])
        return
    if isinstance(source, Iterable):
        for batch in source:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            yield as_uint8_batch(batch)
        return
    raise TypeError(f"unsupported image source {type(source).__name__}")


def describe(source) -> str:
    """How records and errors name a source (statistics: ``stats:<their source>``)."""
    if isinstance(source, (str, Path)):
        return str(source)
    if hasattr(source, "mu") and hasattr(source, "sigma"):  # difftools.metrics.stats.Stats
        return f"stats:{source.source}"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"in-memory {type(source).__name__} {tuple(source.shape)}"
    return f"iterable {type(source).__name__}"


def images_sha256(source, batch_size: int = 256) -> tuple[str, int]:
    """sha256 of the uint8 pixels of an image source, in order (independent of batch size), and n."""
    h, n = hashlib.sha256(), 0
    for batch in iter_images(source, batch_size):
        h.update(batch.cpu().numpy().tobytes())
        n += len(batch)
    return h.hexdigest(), n


def dataset_images(dataset, batch_size: int = 500) -> Iterator[torch.Tensor]:
    """uint8 batches of a toolkit dataset (items ``(x in [-1, 1], label)``), in order."""
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        yield float_to_uint8(x)


def first_images(batches: Iterator[torch.Tensor], n: int | None) -> Iterator[torch.Tensor]:
    """The first ``n`` images of a stream of batches (all of them for None)."""
    seen = 0
    for b in batches:
        if n is not None:
            b = b[: n - seen]
        if len(b):
            yield b
        seen += len(b)
        if n is not None and seen >= n:
            return
