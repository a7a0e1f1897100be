"""Feature extractors for Fréchet distances: Inception-v3 (FID) and any difftools classifier.

Every extractor maps a batch of uint8 images ``[B, C, H, W]`` (C = 1 or 3, values 0..255, any
device) to float32 features ``[B, D]`` and carries

* ``name``: the feature space; the metric computed in it is ``fd_<name>``, except that Inception
  features computed with the official weights are called ``fid`` (Heusel et al. 2017,
  arXiv 1706.08500);
* ``protocol()``: everything a reader needs to reproduce the number (weights file and its sha256,
  resize path, preprocessing).

Inception preprocessing follows clean-fid (Parmar et al. 2022, arXiv 2104.11222) exactly:

* ``legacy_pytorch`` (pytorch-fid's numbers): bilinear resize to 299x299 with
  ``F.interpolate(align_corners=False)`` on the float image in [0, 255], clip, divide by 255, then
  clean-fid's ``InceptionV3`` (pytorch-fid's FID-Inception variant) pool3 features. The resize is
  the same torch op clean-fid applies per image, here batched on the feature device.
* ``clean``: PIL bicubic resize per channel in float32 (clean-fid's ``build_resizer("clean")``, on
  the CPU), then the TorchScript Inception of StyleGAN/clean-fid on ``(x - 128) / 128``.

Weights are never downloaded unless ``allow_download=True`` is passed explicitly.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

import cleanfid.inception_pytorch as cleanfid_inception
import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import check_download_inception
from cleanfid.resize import build_resizer

from difftools.checkpoint import EMA_FILE, CheckpointError, resolve_checkpoint
from difftools.checkpoint import load as load_checkpoint
from difftools.device import default_device  # noqa: F401 (re-exported: metrics callers use it)
from difftools.files import cache_dir, file_sha256
from difftools.models.classifier import Classifier

# pytorch-fid names its file with the first 8 hex digits of the file's sha256.
PT_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
PT_INCEPTION_SHA256_PREFIX = "6726825d"
TS_INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_MODES = ("legacy_pytorch", "clean")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey [B,1,H,W] -> RGB by repeating the channel (what PIL's ``convert('RGB')`` does)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """RGB -> grey with PIL's ``convert('L')`` weights L = (299 R + 587 G + 114 B) / 1000."""
    if images.shape[1] == 1:
        return images
    w = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() * w).sum(1, keepdim=True)


@contextlib.contextmanager
def exact_fp32():
    """Disable TF32 while extracting features: FID is defined in fp32 and TF32 shifts it."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


class FeatureExtractor(ABC):
    """Base class: ``extractor(images uint8 [B,C,H,W]) -> float32 features [B, D]`` on the CPU."""

    name: str = "features"
    dim: int = 0
    batch_size: int = 256

    def __init__(self, device: str | torch.device | None = None):
        self.device = default_device(device)

    @property
    def metric(self) -> str:
        return f"fd_{self.name}"

    def key(self) -> str:
        """Identifies the feature space in cache file names (name + weights hash)."""
        return self.name

    def protocol(self) -> dict:
        return {"features": self.name, "dim": self.dim}

    @abstractmethod
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Features [N, dim] of uint8 images [N, C, H, W] (called under no_grad)."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                "feature extractors take uint8 images [B, C, H, W] with C in (1, 3), got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        with exact_fp32():
            return self.extract(images.to(self.device)).float().cpu()


# ------------------------------------------------------------------------------------ Inception
def resolve_inception_weights(
    path: str | Path | None = None, mode: str | None = None, allow_download: bool = False
) -> Path:
    """Find the local Inception weights file: ``path``, else ``$DIFFTOOLS_FID_WEIGHTS``, else the
    default file in ``<cache>/fid/``. Downloads into that default place only if ``allow_download``."""
    path = path or os.environ.get("DIFFTOOLS_FID_WEIGHTS")
    if path:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        raise FileNotFoundError(
            f"Inception weights not found at {path} (from the argument or $DIFFTOOLS_FID_WEIGHTS). Put "
            f"pytorch-fid's {PT_INCEPTION_FILE} (legacy_pytorch mode) or clean-fid's TorchScript "
            f"{TS_INCEPTION_FILE} (clean mode) there."
        )
    mode = mode or "legacy_pytorch"
    default = cache_dir() / "fid" / (PT_INCEPTION_FILE if mode == "legacy_pytorch" else TS_INCEPTION_FILE)
    if default.is_file():
        return default
    if not allow_download:
        raise FileNotFoundError(
            f"No Inception weights for FID ({mode} mode). Either set DIFFTOOLS_FID_WEIGHTS=<file> (or pass "
            f"the weights argument), or copy the file to {default}: pytorch-fid's {PT_INCEPTION_FILE} "
            "(github.com/mseitzer/pytorch-fid releases, fid_weights) for legacy_pytorch mode, or "
            f"{TS_INCEPTION_FILE} (the StyleGAN2-ADA metrics TorchScript file) for clean mode. Pass "
            "allow_download=True (scripts: --download) to fetch it, or use a classifier feature space "
            "(fd_<classifier>) instead."
        )
    default.parent.mkdir(parents=True, exist_ok=True)
    if mode == "legacy_pytorch":
        torch.hub.download_url_to_file(cleanfid_inception.FID_WEIGHTS_URL, str(default))
    else:
        check_download_inception(fpath=str(default.parent))
    return default


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files holding a ``code/`` folder; state dicts never do."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


@contextlib.contextmanager
def cleanfid_local_state_dict(state_dict: dict):
    """Make clean-fid's ``InceptionV3`` take its weights from ``state_dict`` instead of the network.

    clean-fid builds the FID-Inception in ``cleanfid.inception_pytorch.fid_inception_v3``, which
    fetches weights only through that module's ``load_state_dict_from_url``; swapping that one
    name for the duration of construction keeps clean-fid's own architecture code and reads our
    local file, with no download."""
    original = cleanfid_inception.load_state_dict_from_url
    cleanfid_inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        cleanfid_inception.load_state_dict_from_url = original


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 features (2048-d) from a local weights file, in clean-fid's modes.

    Args:
        weights: the weights file (default ``$DIFFTOOLS_FID_WEIGHTS`` or ``<cache>/fid/...``).
        mode: ``legacy_pytorch`` (pytorch-fid state dict) or ``clean`` (TorchScript); default: from
            the file's format.
        allow_download: fetch the official file into the cache if no local file exists.
    """

    dim = 2048
    batch_size = 128

    def __init__(
        self,
        weights: str | Path | None = None,
        mode: str | None = None,
        allow_download: bool = False,
        device=None,
        batch_size: int | None = None,
    ):
        super().__init__(device)
        self.weights = resolve_inception_weights(weights, mode, allow_download)
        file_mode = "clean" if is_torchscript(self.weights) else "legacy_pytorch"
        if mode is not None and mode not in INCEPTION_MODES:
            raise ValueError(f"unknown Inception mode {mode!r}; expected one of {INCEPTION_MODES}")
        if mode is not None and mode != file_mode:
            raise ValueError(f"{self.weights} is a {file_mode} weights file, but mode={mode!r} was asked")
        self.mode = file_mode
        self.batch_size = batch_size or self.batch_size
        self.sha256 = file_sha256(self.weights)
        self.official = (
            self.sha256.startswith(PT_INCEPTION_SHA256_PREFIX) if self.mode == "legacy_pytorch" else None
        )
        # Named FID only with Inception FID weights; a pytorch-fid file whose hash is not the official
        # one (e.g. the random test network) is reported under another name.
        self.name = "inception" if self.official is not False else "inception_unverified"
        if self.mode == "legacy_pytorch":
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
            with cleanfid_local_state_dict(state):
                self.net = cleanfid_inception.InceptionV3(output_blocks=[3], resize_input=False)
        else:
            self.net = torch.jit.load(str(self.weights), map_location="cpu")
            self.resize = build_resizer("clean")
        self.net = self.net.eval().to(self.device)

    @property
    def metric(self) -> str:
        return "fid" if self.name == "inception" else f"fd_{self.name}"

    def key(self) -> str:
        return f"inception-{self.mode}-{self.sha256[:12]}"

    def protocol(self) -> dict:
        return {
            "features": "inception_v3_pool3",
            "dim": self.dim,
            "mode": self.mode,
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "official_weights": self.official,
            "resize": (
                "torch bilinear 299 (align_corners=False), batched"
                if self.mode == "legacy_pytorch"
                else "PIL bicubic 299, float32 per channel (clean-fid)"
            ),
            "implementation": "clean-fid 0.1.35 networks",
        }

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = to_rgb(images).float()
        if self.mode == "legacy_pytorch":
            # clean-fid: make_resizer("PyTorch", False, "bilinear", (299, 299)) then model(x / 255)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).clamp(0, 255)
            return self.net(x / 255)[0].flatten(1)
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        x = torch.from_numpy(np.stack([self.resize(a) for a in arr])).permute(0, 3, 1, 2).to(self.device)
        return self.net.layers.forward((x - 128) / 128).reshape(x.shape[0], self.dim)


# ----------------------------------------------------------------------------------- classifier
def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Load a classifier checkpoint (written by ``train/classifier.py`` through
    :func:`difftools.checkpoint.save_checkpoint` with ``kind: classifier``).

    Returns the model (eval mode) and a dict with ``name``, ``weights_sha256``, ``dataset_info``,
    ``process`` (noise-conditional only), ``test_accuracy`` and ``path``."""
    ckpt = resolve_checkpoint(path)
    loaded = load_checkpoint(ckpt, use_ema=True, device=device)
    kind = loaded.config.get("checkpoint", {}).get("kind")
    if kind != "classifier" or not isinstance(loaded.model, Classifier):
        raise CheckpointError(
            f"{ckpt} is a {kind!r} checkpoint, not a classifier (train one with "
            "`python train/classifier.py data=<name>`)"
        )
    meta = {
        "name": loaded.model.name,
        "weights_sha256": file_sha256(ckpt / EMA_FILE),
        "dataset_info": loaded.dataset_info,
        "process": loaded.process,
        "test_accuracy": loaded.config.get("result", {}).get("test_accuracy"),
        "path": str(ckpt),
    }
    return loaded.model, meta


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features of a :class:`difftools.models.classifier.Classifier` (at t = 0).

    Images are mapped to the classifier's input: [-1, 1], its channel count (grey <-> RGB as PIL
    does) and its resolution (bilinear, antialiased, only when the size differs)."""

    batch_size = 512

    def __init__(
        self, classifier, name: str, device=None, sha256: str | None = None, path: str | None = None
    ):
        super().__init__(device)
        self.net = classifier.eval().to(self.device)
        self.name, self.sha256, self.path = name, sha256, path
        self.dim = classifier.feature_dim

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None) -> ClassifierFeatures:
        clf, meta = load_classifier(path)
        return cls(clf, name=meta["name"], device=device, sha256=meta["weights_sha256"], path=str(path))

    def key(self) -> str:
        return f"{self.name}-{(self.sha256 or 'nohash')[:12]}"

    def protocol(self) -> dict:
        return {
            "features": f"classifier penultimate ({self.name})",
            "dim": self.dim,
            "classifier": self.path,
            "weights_sha256": self.sha256,
            "input": f"{self.net.in_channels}x{self.net.image_size}x{self.net.image_size} in [-1,1]",
            "resize": f"torch bilinear, antialiased, to {self.net.image_size}px (only when the size differs)",
        }

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the classifier's float input in [-1, 1]."""
        x = images.float()
        x = to_rgb(x) if self.net.in_channels == 3 else to_grey(x)
        if x.shape[-1] != self.net.image_size or x.shape[-2] != self.net.image_size:
            x = F.interpolate(
                x, size=(self.net.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        return x / 127.5 - 1.0

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.prepare(images))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with exact_fp32():
            return self.net(self.prepare(images.to(self.device))).float().cpu()


class PixelFeatures(FeatureExtractor):
    """Average-pooled pixels: each image (in [0, 1], its own channels) pooled to ``pool`` x ``pool``.

    No network and no weights, so it is always available, and fast; but it measures only coarse
    layout and colour, not sample quality. Meant for the ``--smoke`` modes and tests (``fd_pixels4x4``).
    """

    batch_size = 1024

    def __init__(self, channels: int, pool: int = 4, device=None):
        super().__init__(device)
        self.channels, self.pool = int(channels), int(pool)
        self.name = f"pixels{self.pool}x{self.pool}"
        self.dim = self.channels * self.pool**2

    def key(self) -> str:
        return f"{self.name}-{self.channels}ch"

    def protocol(self) -> dict:
        return {"features": f"adaptive average pool to {self.pool}x{self.pool} of pixels / 255",
                "dim": self.dim, "channels": self.channels}

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.channels:
            raise ValueError(f"{self.key()} takes {self.channels}-channel images, got {images.shape[1]}")
        return F.adaptive_avg_pool2d(images.float() / 255, self.pool).flatten(1)


def build_extractor(
    spec: str | Path | FeatureExtractor = "inception",
    device=None,
    weights: str | Path | None = None,
    mode: str | None = None,
    allow_download: bool = False,
) -> FeatureExtractor:
    """``"inception"`` -> :class:`InceptionFeatures`; a classifier checkpoint directory ->
    :class:`ClassifierFeatures`; an extractor is returned as is."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if str(spec) == "inception":
        return InceptionFeatures(weights, mode=mode, allow_download=allow_download, device=device)
    path = Path(spec)
    if path.is_dir():
        return ClassifierFeatures.from_checkpoint(path, device=device)
    raise FileNotFoundError(
        f"features {spec!r}: expected 'inception' or a classifier checkpoint directory "
        "(train one with `python train/classifier.py data=<name>`)"
    )
