"""Cached autoencoder latents: encode a dataset once, train the latent DiT from the cache.

Layout of a cache directory (one per split)::

    meta.json                 format, autoencoder config + weight checksum, source dataset, shapes,
                              shard list with sha256 of every shard file
    shard_00000.safetensors   "latents" [n, V, C, h, w] (V = 2 with horizontal-flip variants:
                              view 0 = the image, view 1 = its mirror, each encoded separately),
                              "labels" [n] int64
    ...

Latents are stored already scaled, z = (E(x) - shift) * scale, with the scale/shift recorded in the
autoencoder config, so a DiT trained on them decodes its samples with exactly that autoencoder.
Encoding the mirror image separately (rather than mirroring the latent) is what the cache is for:
E(flip(x)) != flip(E(x)) for a convolutional encoder with asymmetric kernels.

A cache refuses to serve an autoencoder whose weights differ from the one that made it (sha256 of
the weights, ``Autoencoder.checksum``): mixing latent spaces silently produces garbage samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from difftools.data.base import DatasetInfo, flip_key
from difftools.models.vae import autoencoder_from_config

log = logging.getLogger(__name__)

FORMAT = "difftools-latents-v1"
__all__ = ["cache_latents", "LatentDataset", "AutoencoderMismatchError", "FORMAT"]


class AutoencoderMismatchError(ValueError):
    """The latent cache was made with a different autoencoder than the one given."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _info_dict(dataset) -> dict:
    info = getattr(dataset, "info", None)
    if info is None:
        return {}
    fields = ("name", "channels", "image_size", "num_classes", "class_names")
    d = {k: getattr(info, k, None) for k in fields}
    if d.get("class_names") is not None:
        d["class_names"] = list(d["class_names"])
    return d


@torch.no_grad()
def cache_latents(
    dataset: Dataset,
    autoencoder,
    out_dir,
    flip: bool = True,
    batch_size: int = 64,
    shard_size: int = 10000,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    scale_images: int = 1024,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> Path:
    """Encode ``dataset`` ((x in [-1,1], label) items) with ``autoencoder`` into ``out_dir``.

    If the autoencoder defines no scale, it is first estimated (1/std, mean shift) on the first
    ``scale_images`` images and recorded. ``limit`` caps the number of items (smoke runs).
    The directory is written under a temporary name and renamed, so a cache is complete or absent.
    """
    out_dir = Path(out_dir)
    n_total = len(dataset) if limit is None else min(limit, len(dataset))
    store_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    ae = autoencoder.to(device)
    subset = torch.utils.data.Subset(dataset, range(n_total))
    if ae.scale is None:
        xs = torch.stack([subset[i][0] for i in range(min(scale_images, n_total))]).to(device)
        ae.fit_scale(xs)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    shards, buf_z, buf_y, n_buf, n_done = [], [], [], 0, 0
    latent_shape = None

    def flush():
        nonlocal buf_z, buf_y, n_buf
        if not n_buf:
            return
        name = f"shard_{len(shards):05d}.safetensors"
        z = torch.cat(buf_z).contiguous()
        yv = torch.cat(buf_y).contiguous()
        save_file({"latents": z, "labels": yv}, str(tmp / name))
        shards.append({"file": name, "count": int(z.shape[0]), "sha256": _sha256_file(tmp / name)})
        buf_z, buf_y, n_buf = [], [], 0

    for x, y in loader:
        x = x.to(device)
        views = [ae.encode(x)]
        if flip:
            views.append(ae.encode(x.flip(-1)))
        z = torch.stack(views, dim=1).to("cpu", store_dtype)
        latent_shape = list(z.shape[2:])
        buf_z.append(z)
        buf_y.append(torch.as_tensor(y, dtype=torch.long).view(-1))
        n_buf += z.shape[0]
        n_done += z.shape[0]
        # Shards of exactly shard_size items (except the last), independent of batch_size.
        while n_buf >= shard_size:
            allz, ally = torch.cat(buf_z), torch.cat(buf_y)
            buf_z, buf_y, n_buf = [allz[:shard_size]], [ally[:shard_size]], shard_size
            flush()
            if allz.shape[0] > shard_size:
                buf_z, buf_y, n_buf = [allz[shard_size:]], [ally[shard_size:]], allz.shape[0] - shard_size
        if progress:
            log.info("cached %d / %d", n_done, n_total)
    flush()
    meta = {
        "format": FORMAT,
        "autoencoder": ae.config(),
        "autoencoder_checksum": ae.checksum(),
        "dataset": _info_dict(dataset),
        "num_items": n_done,
        "views": 2 if flip else 1,
        "latent_shape": latent_shape,
        "dtype": dtype,
        "shards": shards,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _resolve_dir(root, path, split) -> Path:
    base = path if path is not None else root
    if base is None:
        raise ValueError("LatentDataset needs root=<cache directory> (made by scripts/cache_latents.py)")
    base = Path(os.path.expanduser(str(base)))
    for cand in (base / split, base):
        if (cand / "meta.json").is_file():
            return cand
    raise FileNotFoundError(
        f"no latent cache at {base} (looked for {base / split / 'meta.json'} and {base / 'meta.json'}). "
        "Make one with: python scripts/cache_latents.py --data <dataset> --vae <autoencoder> --out <dir>"
    )


class LatentDataset(Dataset):
    """Items ``(latent float32 [C, h, w], label int)`` from a cache made by :func:`cache_latents`.

    Args:
        root / path: the cache directory (or its parent holding ``<split>/meta.json``).
        split: sub-directory to use when present.
        random_flip: serve the stored mirror view with probability 1/2, or as the sampler's key
            ``(index, flip)`` says (needs a cache with flips); otherwise always view 0.
        autoencoder: an ``Autoencoder`` or its config dict; if given, its weight checksum must match
            the cache's (``AutoencoderMismatchError`` otherwise), and its scale/shift are set to the
            cache's so that decoding matches the stored latents.
        verify: check every shard's sha256 on load.
        image_size: accepted for ``build_dataset`` compatibility; must equal the cached source size.
    """

    def __init__(
        self,
        root=None,
        split: str = "train",
        random_flip: bool = False,
        autoencoder=None,
        path=None,
        verify: bool = True,
        image_size: int | None = None,
        **_ignored,
    ):
        self.dir = _resolve_dir(root, path, split)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(
                f"{self.dir}: unknown latent cache format {self.meta.get('format')!r}, expected {FORMAT!r}"
            )
        src_size = self.meta["dataset"].get("image_size")
        if image_size is not None and src_size is not None and int(image_size) != int(src_size):
            raise ValueError(f"{self.dir}: cache was made from {src_size}px images, not {image_size}px")
        zs, ys = [], []
        for s in self.meta["shards"]:
            f = self.dir / s["file"]
            if verify and _sha256_file(f) != s["sha256"]:
                raise ValueError(
                    f"{f}: sha256 does not match meta.json (corrupt or edited cache); "
                    "re-create it with scripts/cache_latents.py"
                )
            t = load_file(str(f))
            zs.append(t["latents"])
            ys.append(t["labels"])
        self.latents = torch.cat(zs) if zs else torch.empty(0)
        self.labels = torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)
        self.views = int(self.meta["views"])
        if random_flip and self.views < 2:
            raise ValueError(
                f"{self.dir}: random_flip=True but the cache has no flipped views "
                "(re-create it with flip=true)"
            )
        self.random_flip = bool(random_flip)
        if autoencoder is not None:
            self.check_autoencoder(autoencoder)
        self.info = self._make_info()

    # ------------------------------------------------------------------ autoencoder
    @property
    def autoencoder_config(self) -> dict:
        return dict(self.meta["autoencoder"])

    @property
    def checksum(self) -> str:
        return self.meta["autoencoder_checksum"]

    def autoencoder(self):
        """The autoencoder that made this cache (weights verified, scale/shift from the cache)."""
        ae = autoencoder_from_config(self.autoencoder_config)
        self.check_autoencoder(ae)
        return ae

    def check_autoencoder(self, ae) -> None:
        """Raise AutoencoderMismatchError unless ``ae`` has the weights this cache was made with."""
        if isinstance(ae, dict):
            ae = autoencoder_from_config(ae)
        cfg = self.autoencoder_config
        got = ae.checksum()
        if ae.name != cfg["name"] or got != self.checksum:
            raise AutoencoderMismatchError(
                f"latent cache {self.dir} was made with autoencoder {cfg['name']!r} "
                f"(path {cfg.get('path')}, weights sha256 {self.checksum[:16]}...), but the configured one "
                f"is {ae.name!r} (path {getattr(ae, 'path', None)}, sha256 {got[:16]}...). Use the same "
                "autoencoder (vae=...) or re-create the cache with scripts/cache_latents.py."
            )
        scale, shift = cfg.get("scale"), cfg.get("shift")
        if ae.scale_source == "user" and (ae.scale != scale or ae.shift != shift):
            raise AutoencoderMismatchError(
                f"latent cache {self.dir} stores latents with scale={scale}, shift={shift}, but the "
                f"autoencoder was given scale={ae.scale}, shift={ae.shift}; drop the explicit scale"
            )
        ae.scale, ae.shift, ae.scale_source = scale, shift, "cache"

    def _make_info(self) -> DatasetInfo:
        src = self.meta["dataset"]
        c, h, _ = self.meta["latent_shape"]
        return DatasetInfo(
            name=f"latents:{src.get('name')}",
            channels=int(c),
            image_size=int(h),
            num_classes=int(src.get("num_classes") or 0),
            class_names=tuple(src.get("class_names") or ()),
        )

    @property
    def source_info(self) -> dict:
        """The pixel dataset's info (name, channels, image_size, classes) as recorded in the cache."""
        return dict(self.meta["dataset"])

    # ------------------------------------------------------------------ Dataset
    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, key):
        # key = index, or (index, flip) from difftools.data.loader's resumable sampler
        i, flip = flip_key(key)
        if self.random_flip:
            if flip is None:
                flip = bool(torch.rand(()) < 0.5)
            v = int(flip)
        else:
            v = 0
        return self.latents[i, v].float(), int(self.labels[i])
