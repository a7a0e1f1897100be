"""Images in class subfolders: ``root/<class_name>/*.{png,jpg,jpeg,bmp,webp}`` (classes sorted by name).

Images are read lazily with PIL, converted to RGB (or L with ``channels=1``), resized so the
shorter side is ``image_size`` (bicubic, antialiased) and centre-cropped to a square — the ADM
preprocessing (Dhariwal & Nichol, arXiv 2105.05233) without its random crop.

Because images are decoded only when first served, a damaged file would otherwise surface hours into
a run: an image that fails raises :class:`~difftools.data.base.CorruptDataError` naming the file and
item index, and ``verify=True`` (Hydra: ``data.verify=true``) decodes every image when the dataset
is built and lists every bad file at once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from difftools.data.base import CorruptDataError, DatasetInfo, decode_errors, describe_bad_items, flip_key

_ADVICE = "Remove or replace the file; data.verify=true checks every image before training starts."

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageFolderDataset(Dataset):
    """``(x float32 [C, H, W] in [-1, 1], class index)`` from ``root/<class>/<image>``.

    Args:
        root: folder with one subfolder of images per class.
        image_size: side of the square crop served.
        channels: 3 (RGB) or 1 (grey).
        random_flip: mirror left-right with probability 1/2 (or as the sampler's key says).
        verify: decode every image now and raise one CorruptDataError listing all that fail.
    """

    def __init__(self, root, image_size: int = 64, channels: int = 3, random_flip: bool = False,
                 verify: bool = False):
        if root is None:
            raise ValueError("image_folder needs root=<folder with one subfolder per class>")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image_folder: folder {self.root} does not exist; pass root=<folder with one "
                "subfolder of images per class>"
            )
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [
            (f, label)
            for label, name in enumerate(classes)
            for f in sorted((self.root / name).rglob("*"))
            if f.suffix.lower() in EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"image_folder: no images ({', '.join(EXTENSIONS)}) in class subfolders of "
                f"{self.root}; expected {self.root}/<class_name>/<image>"
            )
        if channels not in (1, 3):
            raise ValueError(f"image_folder: channels must be 1 or 3, got {channels}")
        self.image_size = image_size
        self.random_flip = random_flip
        self.info = DatasetInfo("image_folder", channels, image_size, len(classes), tuple(classes))
        if verify:
            self.verify()

    def __len__(self) -> int:
        return len(self.samples)

    def find_bad_images(self) -> list[tuple[int, str, BaseException]]:
        """Decode every image exactly as training would; ``[(index, path, error)]`` of those that fail."""
        errors = decode_errors()

        def scan(index: int):
            try:
                self._decode(index)
            except errors as err:
                return index, str(self.samples[index][0]), err
            return None

        # PIL releases the GIL while decoding, so threads scale with cores
        with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
            return [bad for bad in pool.map(scan, range(len(self.samples))) if bad is not None]

    def verify(self) -> None:
        """Raise CorruptDataError listing every image that cannot be decoded (nothing if all can)."""
        bad = self.find_bad_images()
        if bad:
            raise CorruptDataError(describe_bad_items(f"image_folder {self.root}", bad, len(self),
                                                      "Remove or replace these files, then run again."))

    def load_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 [H, W, C] after resize and centre crop; CorruptDataError (naming
        the file and index) when it cannot be decoded."""
        try:
            return self._decode(index)
        except decode_errors() as err:
            path = self.samples[index][0]
            raise CorruptDataError(
                f"image_folder: cannot decode item {index} of {len(self)}, {path}: {type(err).__name__}: "
                f"{err}. {_ADVICE}") from err

    def _decode(self, index: int) -> np.ndarray:
        from PIL import Image

        path, _ = self.samples[index]
        with Image.open(path) as im:
            im = im.convert("RGB" if self.info.channels == 3 else "L")
            s = self.image_size / min(im.size)
            w, h = max(self.image_size, round(im.width * s)), max(self.image_size, round(im.height * s))
            im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=None)
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            arr = np.asarray(im, dtype=np.uint8)
        return arr[..., None] if arr.ndim == 2 else arr

    def __getitem__(self, key):
        index, flip = flip_key(key)
        x = torch.from_numpy(self.load_uint8(index).transpose(2, 0, 1).copy()).float() * (2 / 255) - 1
        if self.random_flip:
            if flip is None:
                flip = bool(torch.rand(()) < 0.5)
            if flip:
                x = x.flip(-1)
        return x, self.samples[index][1]
