"""Draw images from a trained run with per-image seeds: what scripts/sample.py, evaluation
(:mod:`difftools.metrics.evaluate`) and the experiment scripts sample with.

Image i of a run with seed s starts from its own noise, drawn on the CPU from numpy's PCG64 seeded
with the SeedSequence of ``[s, i]`` (per-image seeds as in EDM, Karras et al. 2022, arXiv 2206.00364;
a SeedSequence of the pair never collides, whereas torch's CPU generator keeps only 32 bits of its
seed), and gets the label ``i mod num_classes`` (class-balanced, :meth:`Loaded.labels`) or a fixed
class. So image i is the same whatever the batch size, the device count or which other images are
drawn with it (up to float round-off of batched kernels), and any subset of indices can be
(re)drawn alone.

x_T = sigma(1) eps is solved with ``samplers.sample`` from t = 1 down to ``t_end`` (default the
process's ``t_min``, else 1e-3), by default with a final denoising step, then decoded by the run's
autoencoder. Guidance (``samplers.guidance.guided``, against the null class) is applied when the
scale is not 1.

``run`` below is a :class:`difftools.loaded.Loaded` (what :func:`difftools.load` returns).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from difftools.images import float_to_uint8
from samplers import sample
from samplers.guidance import guided
from samplers.sampling import SOLVERS

T_START = 1.0  # sampling starts at pure noise: alpha(1) x0 vanishes for every built-in process


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise [len(indices), *shape] (CPU, float32), one generator per image,
    seeded with the pair ``[seed, index]``."""
    if not len(indices):
        return torch.empty(0, *shape)
    rngs = (np.random.default_rng([int(seed), int(i)]) for i in indices)
    return torch.from_numpy(np.stack([g.standard_normal(tuple(shape), dtype=np.float32) for g in rngs]))


def initial_noise(run, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """x_T of images ``indices``: sigma(1) times their :func:`image_noise` (CPU, float32)."""
    return float(run.process.sigma(T_START)) * image_noise(seed, indices, run.sample_shape)


def end_time(process) -> float:
    """Where sampling stops by default: the process's ``t_min`` (EDM's sigma_min), else t = 1e-3."""
    t_end = getattr(process, "t_min", 1e-3)
    return float(t_end() if callable(t_end) else t_end)


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
    t_end: where the solver stops (None: :func:`end_time` of the process); denoise_final: return
    the x0 prediction there (one more NFE) instead of x(t_end).
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
    t_end: float | None = None
    denoise_final: bool = True

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
    run, indices: Sequence[int], spec: SampleSpec, device=None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Images for ``indices``: (float images [B, C, H, W] in [-1, 1] on the CPU, labels or None, NFE)."""
    device = torch.device(device) if device is not None else next(run.model.parameters()).device
    x_T = initial_noise(run, spec.seed, indices).to(device)
    labels = run.labels(indices, spec.class_label)
    cond = run.cond(None if labels is None else labels.to(device))
    mf = run.model_fn()
    if spec.guidance_scale != 1.0 and labels is not None:
        uncond = run.null_cond(cond["y"])
        mf = guided(mf, spec.guidance, spec.guidance_scale, uncond=uncond, **spec.guidance_opts)
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
            t_start=T_START,
            t_end=end_time(run.process) if spec.t_end is None else float(spec.t_end),
            denoise_final=spec.denoise_final,
            **spec.sampler_opts,
            **cond,
        )
        images = run.decode(x0)
    return images.cpu(), labels, mf.nfe


def batches(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    indices = list(indices)
    for i in range(0, len(indices), batch_size):
        yield indices[i : i + batch_size]


def generate_uint8(
    run, indices: Sequence[int], spec: SampleSpec, batch_size: int, device=None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """:func:`generate` over ``indices`` in batches of ``batch_size``: (uint8 images [n, C, H, W] as an
    image writer stores them, labels or None, NFE per image)."""
    images, labels, nfe = [], [], 0
    for idx in tqdm(list(batches(indices, batch_size)), desc="sampling", unit="batch", disable=not progress):
        x, y, nfe = generate(run, idx, spec, device)
        images.append(float_to_uint8(x))
        if y is not None:
            labels.append(y)
    if not images:  # an empty shard: zero images of the decoded shape
        device = torch.device(device) if device is not None else next(run.model.parameters()).device
        images.append(run.decode_uint8(torch.empty(0, *run.sample_shape, device=device)).cpu())
    return torch.cat(images), (torch.cat(labels) if labels else None), nfe
