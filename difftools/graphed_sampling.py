"""Fixed-shape sampling as one CUDA graph: the evaluation-size path of :mod:`difftools.generate`.

An FID-style evaluation draws tens of thousands of images in batches of one shape with one solver,
step count and guidance scale. :class:`GraphedSampler` compiles the network once
(``torch.compile``, static shapes) and records the WHOLE solve -- every network evaluation
(conditional and unconditional halves batched into one call), the guidance combination and the
solver's linear combinations, ``steps`` x ~30 kernels -- into one CUDA graph over static input
buffers, under bf16 autocast. A batch is then: copy its noise and labels in, replay, read the
result. The solver is :func:`samplers.sample` itself, so the numbers are the library sampler's: on
the CPU (no graph, no compile) the images equal :func:`difftools.generate.generate_uint8`'s bit for
bit; on the GPU the graph replays exactly the kernels of an eager run.

What a graph cannot hold is refused with the reason: guidance with an ``interval`` (the wrapper tests
the interval on the device and branches on the host), and nothing may synchronise with the host
inside the solve. Batches are padded to the fixed size by repeating the last index (the padding
images are drawn and dropped; per-image seeds keep every kept image what it is alone).

    spec = SampleSpec(sampler="dpmpp_2m", steps=19, guidance_scale=1.5)     # 20 NFE with the final step
    sampler = GraphedSampler(run, spec, batch_size=500)
    images, labels, nfe = generate_graphed(run, range(50_000), sampler)   # uint8 [50000, C, H, W]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from difftools.generate import T_START, SampleSpec, batches, end_time, initial_noise
from difftools.images import float_to_uint8
from samplers import ModelFn, sample
from samplers.guidance import guided


class GraphedSampler:
    """``sampler(x_T, labels) -> x0`` for batches of exactly ``batch_size`` samples (module docstring).

    Args:
        run: a :class:`difftools.loaded.Loaded` (its model, process, prediction, labels, decoder).
        spec: how to sample (:class:`difftools.generate.SampleSpec`); ``spec.precision`` bf16 means
            bf16 autocast on CUDA.
        batch_size: the fixed batch (images per replay; the network sees twice that with guidance).
        device: where to sample (default: the model's device).
        compile: ``torch.compile`` the network (CUDA only; default on).
        cuda_graph: record the solve as a CUDA graph (CUDA only; default on).
        warmup: eager solves before the capture (compilation, kernel selection).
    """

    def __init__(self, run, spec: SampleSpec, batch_size: int, device=None, compile: bool = True,
                 cuda_graph: bool = True, warmup: int = 2):
        self.run, self.spec = run, spec.validate()
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else next(run.model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.cuda_graph, self.warmup = bool(cuda_graph) and on_cuda, int(warmup)
        if self.cuda_graph and spec.guidance_opts.get("interval") is not None and spec.guidance_scale != 1.0:
            raise ValueError("GraphedSampler: guidance with an interval decides on the host which samples to "
                             "guide, which a CUDA graph cannot hold; drop guidance_opts['interval'] or pass "
                             "cuda_graph=False")
        net = run.model
        if compile and on_cuda:
            net = torch.compile(net, dynamic=False)
        base = run.model_fn()
        self.model_fn = ModelFn(net, base.process, base.prediction, time_input=base.time_input)
        self.x_T = torch.zeros(self.batch_size, *run.sample_shape, device=self.device)
        labels = run.labels(range(self.batch_size))
        self.labels = None if labels is None else labels.to(self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.calls = 0
        self.nfe = 0

    def _autocast(self):
        if self.device.type == "cuda" and self.spec.precision == "bf16":
            # no weight-cast cache: a cached cast would outlive the graph capture
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _solve(self) -> torch.Tensor:
        """:func:`samplers.sample` on the static buffers, as :func:`difftools.generate.generate` calls it."""
        spec, mf = self.spec, self.model_fn
        mf.reset()
        cond = self.run.cond(self.labels)
        if spec.guidance_scale != 1.0 and self.labels is not None:
            mf = guided(mf, spec.guidance, spec.guidance_scale, uncond=self.run.null_cond(self.labels),
                        **spec.guidance_opts)
        with self._autocast():
            x0 = sample(mf, self.x_T, solver=spec.sampler, steps=int(spec.steps), schedule=spec.schedule,
                        t_start=T_START,
                        t_end=end_time(self.run.process) if spec.t_end is None else float(spec.t_end),
                        denoise_final=spec.denoise_final, **spec.sampler_opts, **cond)
        self.nfe = mf.nfe
        return x0

    @torch.no_grad()
    def __call__(self, x_T: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """x0 [batch_size, *sample_shape] (float32, on the device; overwritten by the next call when a
        graph is replayed: copy what you keep)."""
        if x_T.shape != self.x_T.shape:
            raise ValueError(f"GraphedSampler was built for batches {tuple(self.x_T.shape)}, got "
                             f"{tuple(x_T.shape)} (pad the batch; generate_graphed does)")
        self.x_T.copy_(x_T, non_blocking=True)
        if self.labels is not None:
            self.labels.copy_(labels, non_blocking=True)
        if not self.cuda_graph or self.calls < self.warmup:
            self.calls += 1
            return self._solve()
        if self.graph is None:
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.out = self._solve()
            except Exception as err:
                raise RuntimeError("GraphedSampler: capturing the sampling loop failed "
                                   f"({type(err).__name__}: {err}); pass cuda_graph=False (sampler "
                                   f"{self.spec.sampler!r}, options {self.spec.sampler_opts})") from err
            self.graph = graph
        self.graph.replay()
        self.calls += 1
        return self.out


def pad_indices(indices: Sequence[int], size: int) -> list[int]:
    """``indices`` padded to ``size`` by repeating the last one."""
    indices = list(indices)
    return indices + [indices[-1]] * (size - len(indices))


@torch.no_grad()
def generate_graphed(run, indices: Sequence[int], sampler: GraphedSampler, progress: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """:func:`difftools.generate.generate_uint8` through ``sampler``: (uint8 images [n, C, H, W] on the
    CPU, labels or None, NFE per image). The next batch's noise is drawn on the CPU while the GPU
    solves the current one."""
    spec, size = sampler.spec, sampler.batch_size
    chunks = list(batches(indices, size))
    images, all_labels = [], []

    def inputs(chunk):
        padded = pad_indices(chunk, size)
        labels = run.labels(padded, spec.class_label)
        return initial_noise(run, spec.seed, padded), labels

    pending = inputs(chunks[0]) if chunks else None
    for i, chunk in enumerate(tqdm(chunks, desc="sampling", unit="batch", disable=not progress)):
        x_T, labels = pending
        x0 = sampler(x_T.to(sampler.device), None if labels is None else labels.to(sampler.device))
        with sampler._autocast():  # decoded under the sampling precision, as generate() does
            out = float_to_uint8(run.decode(x0[: len(chunk)]))  # queued behind the solve on the GPU
        if i + 1 < len(chunks):
            pending = inputs(chunks[i + 1])  # CPU work while the GPU runs
        images.append(out.cpu())
        if labels is not None:
            all_labels.append(labels[: len(chunk)])
    if not images:
        return run.decode_uint8(torch.empty(0, *run.sample_shape)), None, 0
    return torch.cat(images), (torch.cat(all_labels) if all_labels else None), sampler.nfe
