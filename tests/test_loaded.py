"""The loaded-run API (difftools.loaded.Loaded), sample generation (difftools.generate), the test
models (difftools.testing) and the shared file utilities (difftools.files)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import difftools
from difftools.checkpoint import atomic_file as checkpoint_atomic_file
from difftools.files import atomic_file, cache_dir, file_sha256
from difftools.generate import SampleSpec, generate, generate_uint8, image_noise, initial_noise
from difftools.loaded import Loaded
from difftools.process import EDM, Flow
from difftools.testing import save_smoke_checkpoint, smoke_run, tiny_dit
from samplers import ModelFn
from samplers.atomic import atomic_file as samplers_atomic_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke checkpoint written and read back: the API on what difftools.load returns."""
    return difftools.load(save_smoke_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_1", perturb=0.1))


def test_loaded_run_reports_shape_classes_and_dataset(run):
    assert isinstance(run, Loaded) and run.path is not None and run.path.name == "step_1"
    assert run.sample_shape == (1, 16, 16)
    assert (run.num_classes, run.null_class) == (10, 10)
    assert run.reference_dataset() == ("digits", 16, None)
    assert run.labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert run.labels([13, 7, 20]).tolist() == [3, 7, 0]  # i mod K whatever the batch
    assert run.labels(range(3), class_label=7).tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match=r"class_label 10 outside 0\.\.9 \(.*step_1 has 10 classes\)"):
        run.labels(3, class_label=10)
    y = run.labels(4)
    assert run.cond(y)["y"] is y and run.cond(None) == {}
    assert run.null_cond(y)["y"].tolist() == [10, 10, 10, 10]


def test_model_fn_is_the_flow_model_as_a_denoiser(run):
    """flow prediction v = eps - x0 with x_t = (1 - t) x0 + t eps, so x0 = x_t - t v."""
    mf = run.model_fn()
    assert isinstance(mf, ModelFn) and mf.nfe == 0
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        v = run.model(x, t, y=y)
        x0 = mf.x0(x, t, y=y)
    assert v.abs().mean() > 1e-3  # the perturbed smoke model is not the zero function
    torch.testing.assert_close(x0, x - t.view(-1, 1, 1, 1) * v)
    assert mf.nfe == 1 and run.model_fn().nfe == 0  # a fresh counter per call


class ToyAutoencoder(torch.nn.Module):
    """Latents [B, 1, 4, 4] -> images [B, 3, 16, 16]: nearest x4, three channels, values doubled."""

    downsample = 4

    def decode(self, z):
        return 2 * z.repeat_interleave(4, -1).repeat_interleave(4, -2).expand(-1, 3, -1, -1)


def test_latent_run_decodes_to_clamped_uint8_images_of_the_source_dataset():
    run = Loaded(tiny_dit(4, 1, 10, patch_size=2), Flow(), "flow", ToyAutoencoder(),
                 dataset_info={"name": "latents:cifar10", "channels": 1, "image_size": 4, "num_classes": 10},
                 config={"data": {"name": "latents", "root": "cache/c10"}})
    assert run.sample_shape == (1, 4, 4)
    assert run.reference_dataset() == ("cifar10", 16, "cache/c10")  # the pixel dataset, decoded size
    z = torch.tensor([0.25, 0.75, -1.0, 0.0]).view(1, 1, 2, 2).repeat(1, 1, 2, 2)
    images = run.decode_uint8(z)
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.uint8
    # decode 2z = 0.5, 1.5, -2, 0 -> clamped to [-1, 1] -> round((x + 1) * 127.5)
    assert images[0, :, 0, :8:4].tolist() == [[191, 255]] * 3 and images[0, 0, 4, :8:4].tolist() == [0, 128]


def test_what_a_run_cannot_tell_is_an_error_naming_it():
    class Bare(torch.nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(ValueError, match="a Bare built in code: cannot tell the sample shape: Bare has "
                                         "no in_channels / input_size and the checkpoint records no "
                                         "dataset_info"):
        _ = Loaded(Bare(), Flow(), "flow").sample_shape
    info = {"channels": 3, "image_size": 8}
    assert Loaded(Bare(), Flow(), "flow", dataset_info=info).sample_shape == (3, 8, 8)
    assert Loaded(Bare(), Flow(), "flow").labels(3) is None  # unconditional
    with pytest.raises(ValueError, match="is a classifier model, not a denoiser"):
        Loaded(Bare(), config={"checkpoint": {"kind": "classifier"}}).model_fn()
    with pytest.raises(ValueError, match="cannot tell which image dataset .* pass dataset=<name>"):
        info = {"name": "image_folder", "image_size": 32}
        Loaded(Bare(), Flow(), "flow", dataset_info=info).reference_dataset()


def test_per_image_noise_does_not_depend_on_the_other_indices():
    a, b = image_noise(0, [1, 3], (2, 4)), image_noise(0, [3], (2, 4))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(image_noise(1, [3], (2, 4)), b)  # another seed, other noise
    np.testing.assert_array_equal(b[0].numpy(), np.random.default_rng([0, 3]).standard_normal((2, 4),
                                                                                              dtype=np.float32))
    run = Loaded(tiny_dit(), EDM(), "x0")  # x_T = sigma(1) eps: 80 eps for EDM
    torch.testing.assert_close(initial_noise(run, 0, [3]), 80.0 * image_noise(0, [3], (1, 16, 16)))


def test_generation_is_the_same_per_image_whatever_the_batch(run):
    spec = SampleSpec(steps=3, guidance_scale=2.0, precision="fp32").validate()
    images, labels, nfe = generate_uint8(run, range(7), spec, batch_size=3, device="cpu")
    assert images.shape == (7, 1, 16, 16) and labels.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert nfe == 4  # 3 steps + the final denoising; guidance batches cond and uncond in one evaluation
    alone, label, _ = generate(run, [5], spec)
    assert label.tolist() == [5]
    diff = (images[5].int() - ((alone[0] + 1) * 127.5).round().clamp(0, 255).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02  # batched kernels: round-off only
    unguided, _, _ = generate_uint8(run, range(7), SampleSpec(steps=3, precision="fp32"), 7, "cpu")
    assert (unguided.int() - images.int()).abs().float().mean() > 1  # guidance changes the images
    empty, no_labels, _ = generate_uint8(run, [], spec, 4, "cpu")
    assert empty.shape == (0, 1, 16, 16) and empty.dtype == torch.uint8 and no_labels is None


def test_tiny_dit_is_seeded_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    a, b = tiny_dit(seed=3, perturb=0.1), tiny_dit(seed=3, perturb=0.1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    with torch.no_grad():
        assert torch.count_nonzero(tiny_dit()(x, t)) == 0  # adaLN-Zero: a fresh DiT outputs zeros
        assert a(x, t).abs().mean() > 1e-3
    run = smoke_run("vp")
    assert run.prediction == "eps" and run.dataset_info["name"] == "digits" and run.path is None


def test_file_utilities_live_in_one_place(tmp_path, monkeypatch):
    assert checkpoint_atomic_file is atomic_file is samplers_atomic_file
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"abc").hexdigest()
    monkeypatch.setenv("DIFFTOOLS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
