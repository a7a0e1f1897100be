"""Draw samples from a trained checkpoint with per-image seeds (shared by scripts/sample.py and
:func:`difftools.metrics.evaluate.evaluate_checkpoint`).

Image i of a run with seed s starts from its own noise, drawn on the CPU from numpy's PCG64 seeded
with the SeedSequence of ``[s, i]`` (per-image seeds as in EDM, Karras et al. 2022, arXiv 2206.00364;
a SeedSequence of the pair never collides, whereas torch's CPU generator keeps only 32 bits of
its seed), and gets the
label ``i mod num_classes`` (class-balanced) or a fixed class. So image i is the same whatever the
batch size, the device count or which other images are drawn with it (up to float round-off of
batched kernels), and any subset of indices can be (re)drawn alone.

x_T = sigma(t_start) eps at t_start = 1, solved with ``samplers.sample`` down to t_end =
``process.t_min`` (or 1e-3) with a final denoising step, then decoded by the run's autoencoder.
Guidance (``samplers.guidance.guided``) is applied when the scale is not 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from difftools.metrics.fid import float_to_uint8
from samplers import ModelFn, sample
from samplers.guidance import guided
from samplers.sampling import SOLVERS


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise [len(indices), *shape] (CPU, float32), one generator per image,
    seeded with the pair ``[seed, index]``."""
    return (
        torch.from_numpy(
            np.stack(
                [
                    np.random.default_rng([int(seed), int(i)]).standard_normal(tuple(shape), dtype=np.float32)
                    for i in indices
                ]
            )
        )
        if len(indices)
        else torch.empty(0, *shape)
    )


def image_labels(
    indices: Sequence[int], num_classes: int, class_label: int | None = None
) -> torch.Tensor | None:
    """Label of each image: ``i mod num_classes`` (balanced), or ``class_label`` for all; None if
    the model is unconditional."""
    if not num_classes:
        return None
    if class_label is not None:
        if not 0 <= class_label < num_classes:
            raise ValueError(f"class_label {class_label} outside 0..{num_classes - 1}")
        return torch.full((len(indices),), int(class_label), dtype=torch.long)
    return torch.as_tensor(list(indices), dtype=torch.long) % num_classes


def known_solvers() -> list[str]:
    return sorted(SOLVERS) + ["usf"]


@dataclass
class SampleSpec:
    """How samples are drawn (recorded beside every metric).

    sampler / steps / schedule: the ``samplers.sample`` solver, number of steps and time grid.
    guidance_scale / guidance: classifier-free guidance weight (1 = off) and kind (cfg, apg,
    cfg_zero_star); guidance_opts go to the wrapper (e.g. ``interval``).
    seed: the run seed of the per-image seeds. class_label: sample one class only (None = balanced).
    sampler_opts: further ``samplers.sample`` keywords (order, dualfast, lml, ...).
    precision: ``bf16`` autocast on CUDA (``fp32`` for exact numbers; CPU is always fp32).
    """

    sampler: str = "dpmpp_2m"
    steps: int = 20
    schedule: str = "logsnr"
    guidance_scale: float = 1.0
    guidance: str = "cfg"
    guidance_opts: dict = field(default_factory=dict)
    seed: int = 0
    class_label: int | None = None
    sampler_opts: dict = field(default_factory=dict)
    precision: str = "bf16"

    def validate(self) -> SampleSpec:
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        solvers = known_solvers()
        if self.sampler not in solvers:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(solvers)}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def generate(
    loaded, indices: Sequence[int], spec: SampleSpec, device=None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Images for ``indices``: (float images [B, C, H, W] in [-1, 1] on the CPU, labels or None, NFE).

    ``loaded`` is :class:`difftools.checkpoint.Loaded` (model, process, prediction, autoencoder)."""
    model, process = loaded.model, loaded.process
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shape = (model.in_channels, model.input_size, model.input_size)
    t_start = 1.0
    x_T = (process.sigma(t_start).item() * image_noise(spec.seed, indices, shape)).to(device)
    labels = image_labels(indices, getattr(model, "num_classes", 0), spec.class_label)
    cond = {} if labels is None else {"y": labels.to(device)}
    mf = ModelFn(lambda x, t, **c: model(x, t, **c), process, loaded.prediction)
    if spec.guidance_scale != 1.0 and labels is not None:
        mf = guided(
            mf,
            spec.guidance,
            spec.guidance_scale,
            uncond={"y": torch.full_like(cond["y"], model.null_class)},
            **spec.guidance_opts,
        )
    t_end = getattr(process, "t_min", 1e-3)
    t_end = float(t_end() if callable(t_end) else t_end)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and spec.precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        x0 = sample(
            mf,
            x_T,
            solver=spec.sampler,
            steps=int(spec.steps),
            schedule=spec.schedule,
            t_start=t_start,
            t_end=t_end,
            denoise_final=True,
            **spec.sampler_opts,
            **cond,
        )
        if loaded.autoencoder is not None:
            x0 = loaded.autoencoder.decode(x0)
    return x0.float().clamp(-1, 1).cpu(), labels, mf.nfe


def batches(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    indices = list(indices)
    for i in range(0, len(indices), batch_size):
        yield indices[i : i + batch_size]


def generate_uint8(
    loaded, indices: Sequence[int], spec: SampleSpec, batch_size: int, device=None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """:func:`generate` over ``indices`` in batches of ``batch_size``: (uint8 images [n, C, H, W] as an
    image writer stores them, labels or None, NFE per image)."""
    from tqdm.auto import tqdm

    images, labels, nfe = [], [], 0
    for idx in tqdm(list(batches(indices, batch_size)), desc="sampling", unit="batch", disable=not progress):
        x, y, nfe = generate(loaded, idx, spec, device)
        images.append(float_to_uint8(x))
        if y is not None:
            labels.append(y)
    empty = torch.empty(
        0, loaded.model.in_channels, loaded.model.input_size, loaded.model.input_size, dtype=torch.uint8
    )
    return (torch.cat(images) if images else empty), (torch.cat(labels) if labels else None), nfe
