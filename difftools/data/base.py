"""Dataset plumbing shared by every source: info record, root lookup, in-memory array dataset, resizing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from difftools.files import DATA_DOCS, data_root_setting, data_roots  # noqa: F401 (data_roots: re-exported)

RESIZE_MODES = ("pad", "nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data: channels, (square) image size, classes."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...] = field(default_factory=tuple)


class CorruptDataError(OSError):
    """A data file, or an image inside one, cannot be read or decoded (truncated, damaged, not an
    image). The message names the file, the item index and the decoder's own reason; an OSError like
    PIL's ``image file is truncated``, so handlers of that keep working."""


def decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file that is not a decodable image: truncated or unidentified (OSError),
    broken chunks (SyntaxError, ValueError, EOFError), absurd sizes (DecompressionBombError)."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError


def describe_bad_items(dataset: str, bad: list[tuple[int, str, BaseException]], total: int,
                       advice: str, show: int = 20) -> str:
    """The message for ``bad`` = [(index, where, error)] out of ``total`` items: every bad item up
    to ``show`` (with its file and the decoder's reason), then how many more, then ``advice``."""
    lines = [f"  item {i}: {where}: {type(err).__name__}: {err}" for i, where, err in bad[:show]]
    if len(bad) > show:
        lines.append(f"  ... and {len(bad) - show} more")
    noun = "item" if total == 1 else "items"
    return f"{dataset}: {len(bad)} of {total} {noun} cannot be decoded:\n" + "\n".join(lines) + f"\n{advice}"


def missing(dataset: str, expected: list[Path], what: str, folder: str, root=None) -> FileNotFoundError:
    """The error for absent dataset files: every path tried, how to point at the data (``folder``:
    the subfolder the data root holds, e.g. ``mnist/``) and where the files come from."""
    tried = "\n  ".join(str(p) for p in expected)
    return FileNotFoundError(
        f"{dataset}: no {what} found. Looked for:\n  {tried}\nPoint to the folder that holds {folder} with "
        f"root=<folder> (Hydra: data.root=<folder>) or the DIFFTOOLS_DATA environment variable "
        f"({data_root_setting(root)}). See {DATA_DOCS} for the folder layout, the files, their checksums "
        "and where to get them."
    )


def resize_uint8(images: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize uint8 images [N, H, W, C] to [N, size, size, C].

    ``pad`` centres the image on a zero (black) canvas (MNIST 28 -> 32, as LeNet did) and falls back
    to antialiased bilinear when shrinking; the interpolating modes use torch in float and round.
    """
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    if mode == "pad" and size >= max(h, w):
        out = np.zeros((n, size, size, c), dtype=np.uint8)
        top, left = (size - h) // 2, (size - w) // 2
        out[:, top : top + h, left : left + w] = images
        return out
    resized = resize_float(
        torch.from_numpy(images).permute(0, 3, 1, 2).float(), size, "bilinear" if mode == "pad" else mode
    )
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resize_float(x: torch.Tensor, size: int, mode: str, chunk: int = 4096) -> torch.Tensor:
    """Resize a float batch [N, C, H, W] in chunks (bounded memory); antialias when shrinking."""
    if mode == "nearest":
        kw = dict(mode="nearest-exact")
    else:
        kw = dict(mode=mode, align_corners=False, antialias=size < x.shape[-1])
    return torch.cat(
        [F.interpolate(x[i : i + chunk], size=(size, size), **kw) for i in range(0, len(x), chunk)]
    )


def flip_key(key) -> tuple[int, bool | None]:
    """A sampler key is an index, or (index, flip) from :class:`~difftools.data.loader.ResumableSampler`."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), bool(key[1])
    return int(key), None


class ArrayDataset(Dataset):
    """Images held in memory as one tensor [N, C, H, W] (uint8 0..255, or float in [0, 1]) plus labels.

    Items are ``(x float32 [C, H, W] in [-1, 1], label int)`` with x = 2 * pixel / 255 - 1. With
    ``random_flip`` each item is mirrored left-right with probability 1/2: the decision comes from
    the key when the sampler supplies ``(index, flip)`` (reproducible and resumable, see
    :mod:`difftools.data.loader`), else from torch's global RNG.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, random_flip: bool = False
    ):
        if images.ndim != 4 or images.shape[1] != info.channels:
            raise ValueError(
                f"{info.name}: expected images [N, {info.channels}, H, W], got {tuple(images.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{info.name}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.info = info
        self.random_flip = random_flip
        self._scale = 2.0 / 255.0 if images.dtype == torch.uint8 else 2.0

    def __len__(self) -> int:
        return len(self.images)

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """Stored images (one or a batch, on any device) -> float32 in [-1, 1]: 2 * pixel / 255 - 1
        for uint8 (the arithmetic of every item; the engine's on-device batches use it too)."""
        return images.float() * self._scale - 1.0

    def __getitem__(self, key):
        index, flip = flip_key(key)
        x = self.to_float(self.images[index])
        if self.random_flip:
            if flip is None:
                flip = bool(torch.rand(()) < 0.5)
            if flip:
                x = x.flip(-1)
        return x, int(self.labels[index])

    def __repr__(self) -> str:
        i = self.info
        return (
            f"{type(self).__name__}({i.name}, n={len(self)}, {i.channels}x{i.image_size}x{i.image_size}, "
            f"classes={i.num_classes}, random_flip={self.random_flip})"
        )


def nhwc_uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, C] uint8 numpy -> contiguous [N, C, H, W] uint8 tensor."""
    out = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    # arrays read with np.frombuffer are read-only; torch wants writable memory
    return torch.from_numpy(out if out.flags.writeable else out.copy())
