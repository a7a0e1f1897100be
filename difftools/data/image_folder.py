"""Images in class subfolders: ``root/<class_name>/*.{png,jpg,jpeg,bmp,webp}`` (classes sorted by name).

Images are read lazily with PIL, converted to RGB (or L with ``channels=1``), resized so the
shorter side is ``image_size`` (bicubic, antialiased) and centre-cropped to a square — the ADM
preprocessing (Dhariwal & Nichol, arXiv 2105.05233) without its random crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from difftools.data.base import DatasetInfo, flip_key

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageFolderDataset(Dataset):
    def __init__(self, root, image_size: int = 64, channels: int = 3, random_flip: bool = False):
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

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 [H, W, C] after resize and centre crop."""
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
