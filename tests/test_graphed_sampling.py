"""Fixed-shape graphed sampling (difftools.graphed_sampling): the same images as the library's
per-image-seeded sampler on the CPU, padding, errors; on the GPU the graph against an eager run."""

from __future__ import annotations

import pytest
import torch

from difftools.generate import SampleSpec, generate_uint8
from difftools.graphed_sampling import GraphedSampler, generate_graphed, pad_indices
from difftools.testing import smoke_run


@pytest.fixture
def run(one_thread):
    return smoke_run("flow", perturb=0.05)


@pytest.mark.parametrize("spec", [
    SampleSpec(sampler="dpmpp_2m", steps=4, guidance_scale=2.0, seed=3),
    SampleSpec(sampler="unipc_bh2", steps=3, seed=1, denoise_final=False),
    SampleSpec(sampler="ddim", steps=3, guidance_scale=1.5, class_label=7),
])
def test_cpu_path_equals_the_library_sampler_exactly(run, spec):
    """12 images in fixed batches of 4: bit-identical uint8 images and the same labels and NFE as
    difftools.generate.generate_uint8 (guided, unguided, one class)."""
    ref, ref_labels, ref_nfe = generate_uint8(run, range(12), spec, batch_size=4)
    images, labels, nfe = generate_graphed(run, range(12), GraphedSampler(run, spec, batch_size=4))
    assert torch.equal(images, ref) and torch.equal(labels, ref_labels) and nfe == ref_nfe
    assert images.float().std() > 10  # real images, not a constant


def test_padded_last_batch_keeps_every_image(run):
    """10 images in batches of 4: the last batch is padded with copies of image 9 and cut back;
    every image is the one drawn alone (equal up to batched-kernel round-off)."""
    spec = SampleSpec(sampler="dpmpp_2m", steps=3, guidance_scale=2.0)
    images, labels, _ = generate_graphed(run, range(10), GraphedSampler(run, spec, batch_size=4))
    ref, ref_labels, _ = generate_uint8(run, range(10), spec, batch_size=1)
    assert images.shape == ref.shape == (10, 1, 16, 16)
    assert torch.equal(labels, ref_labels)
    assert (images.int() - ref.int()).abs().max() <= 1
    assert pad_indices([8, 9], 4) == [8, 9, 9, 9]


def test_unconditional_model(one_thread):
    from difftools.loaded import Loaded
    from difftools.process import VP
    from difftools.testing import tiny_dit

    run = Loaded(tiny_dit(16, 1, num_classes=0, perturb=0.05), VP(), "eps")
    spec = SampleSpec(sampler="dpmpp_2m", steps=3)
    ref, ref_labels, _ = generate_uint8(run, range(6), spec, batch_size=3)
    images, labels, _ = generate_graphed(run, range(6), GraphedSampler(run, spec, batch_size=3))
    assert labels is None and ref_labels is None and torch.equal(images, ref)


def test_wrong_batch_shape_is_refused(run):
    sampler = GraphedSampler(run, SampleSpec(steps=2), batch_size=4)
    with pytest.raises(ValueError, match=r"built for batches \(4, 1, 16, 16\), got \(3, 1, 16, 16\)"):
        sampler(torch.zeros(3, 1, 16, 16), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        GraphedSampler(run, SampleSpec(steps=2), batch_size=0)


@pytest.mark.cuda
def test_cuda_graph_replays_the_eager_solve():
    """On the GPU, bf16: the captured solve (no compile) gives the eager generate()'s images (the same
    kernels replayed); with torch.compile the images agree to bf16 round-off."""
    run = smoke_run("flow", perturb=0.05, device="cuda")
    spec = SampleSpec(sampler="dpmpp_2m", steps=6, guidance_scale=2.0)
    ref, _, _ = generate_uint8(run, range(32), spec, batch_size=8, device="cuda")
    graphed, _, _ = generate_graphed(run, range(32), GraphedSampler(run, spec, 8, compile=False))
    assert (graphed.int() - ref.int()).abs().max() <= 1
    compiled, _, _ = generate_graphed(run, range(32), GraphedSampler(run, spec, 8, compile=True))
    assert (compiled.float() - ref.float()).abs().mean() < 1.0  # mean |difference| < 1 grey level
