"""Metrics: FID equals clean-fid's; Fréchet-distance properties; sources; cached reference stats."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from difftools.data import CorruptDataError
from difftools.metrics import features as feat_mod
from difftools.metrics.features import PT_INCEPTION_FILE, ClassifierFeatures, InceptionFeatures
from difftools.metrics.fid import (
    FrechetSampleSizeWarning,
    Stats,
    compare,
    compute_stats,
    fd,
    float_to_uint8,
    gaussian_fit,
    images_sha256,
    iter_images,
    reference_path,
    reference_stats,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # two shared cores: one thread avoids OpenMP spin-waiting against the other test processes
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # scipy's sqrtm of 2048x2048: 5x faster on one BLAS thread here
        yield
    torch.set_num_threads(n)


def random_fid_inception_state(seed: int = 0) -> dict:
    """An Inception-v3 in pytorch-fid's FID layout (torchvision Inception3 with 1008 classes and the
    FIDInceptionA/C/E blocks clean-fid uses) with fixed random weights, as a state dict."""
    import cleanfid.inception_pytorch as ip
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    net.Mixed_5b = ip.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = ip.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = ip.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = ip.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = ip.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = ip.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = ip.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = ip.FIDInceptionE_1(1280)
    net.Mixed_7c = ip.FIDInceptionE_2(2048)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):  # He init keeps the activation scale through ~90 layers
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.8, 1.2)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return net.state_dict()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """The random FID-Inception saved under pytorch-fid's file name inside a fake torch hub cache."""
    hub = tmp_path_factory.mktemp("torch_home")
    path = hub / "hub" / "checkpoints" / PT_INCEPTION_FILE
    path.parent.mkdir(parents=True)
    torch.save(random_fid_inception_state(), path)
    return path


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(folder / f"{i:04d}.png")
    return folder


def test_fid_equals_cleanfid_legacy_pytorch(inception_file, tmp_path, monkeypatch):
    """Our FID == cleanfid.fid.compute_fid(mode="legacy_pytorch") on two folders, same weights file.

    clean-fid fetches pytorch-fid's weights through torch.hub's load_state_dict_from_url, which
    reads $TORCH_HOME/hub/checkpoints/<file name> when present: pointing TORCH_HOME at the test's
    folder makes it load the random network from disk. Downloads are made to fail loudly."""
    from cleanfid.fid import compute_fid

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(inception_file.parents[2]))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 128, a.shape), 0, 255).astype(np.uint8)
    dir_a, dir_b = write_folder(tmp_path / "a", a), write_folder(tmp_path / "b", b)

    ours = compare(
        dir_a, dir_b, features=InceptionFeatures(inception_file, device="cpu", batch_size=8), with_kid=False
    )
    ref = compute_fid(
        str(dir_a),
        str(dir_b),
        mode="legacy_pytorch",
        device=torch.device("cpu"),
        num_workers=0,
        batch_size=8,
        use_dataparallel=False,
        verbose=False,
    )
    assert ours["n_a"] == ours["n_b"] == 8
    assert ref > 1.0  # a real, non-degenerate distance
    assert ours["value"] == pytest.approx(ref, rel=1e-4)
    # random weights are not the official file: never reported as "fid"
    assert ours["metric"] == "fd_inception_unverified"
    assert ours["protocol"]["mode"] == "legacy_pytorch" and ours["protocol"]["official_weights"] is False


def test_inception_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTOOLS_CACHE", str(tmp_path))
    monkeypatch.delenv("DIFFTOOLS_FID_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "fid" / PT_INCEPTION_FILE)):
        InceptionFeatures(device="cpu")
    monkeypatch.setenv("DIFFTOOLS_FID_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        InceptionFeatures(device="cpu")


def test_torchscript_clean_mode_wrapper(tmp_path):
    """A TorchScript file is detected as clean mode and fed (x - 128) / 128 after PIL bicubic 299."""

    class Layers(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x):
            return self.layers(x)

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Base()).save(str(path))
    ext = InceptionFeatures(path, device="cpu")
    assert ext.mode == "clean" and ext.metric == "fid"
    img = torch.full((2, 3, 20, 20), 200, dtype=torch.uint8)
    out = ext(img)
    assert out.shape == (2, 2048)
    assert torch.allclose(out, torch.full_like(out, (200 - 128) / 128), atol=1e-5)


# ------------------------------------------------------------------------ classifier feature space
@pytest.fixture(scope="module")
def digits_features(tmp_path_factory):
    """The cached default digits classifier, trained once into a temporary cache."""
    from difftools.metrics.classifier import default_classifier

    torch.set_num_threads(1)
    return default_classifier("digits", cache=tmp_path_factory.mktemp("clf"), device="cpu", log=None)


@pytest.fixture(scope="module")
def digits_test_uint8():
    from difftools.data import build_dataset
    from difftools.metrics.classifier import dataset_tensors

    return dataset_tensors(build_dataset("digits", split="test"))


def test_fd_zero_on_identical_and_monotone_in_noise(digits_features, digits_test_uint8):
    x, _ = digits_test_uint8
    base = compute_stats(x, digits_features)
    assert abs(fd(base, base)) < 1e-6 * float(np.trace(base.sigma))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    values = []
    for level in (0.05, 0.1, 0.2, 0.4, 0.8):
        noisy = (x.float() / 127.5 - 1 + level * noise).clamp(-1, 1)
        values.append(fd(base, compute_stats(noisy, digits_features)))
    assert values[0] > 0
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values


def test_sources_agree_folder_npz_tensor_generator(digits_features, digits_test_uint8, tmp_path):
    x, _ = digits_test_uint8
    x = x[:100]
    nhwc = x.permute(0, 2, 3, 1).numpy()
    folder = write_folder(tmp_path / "png", nhwc)
    np.savez(tmp_path / "imgs.npz", images=nhwc)
    floats = x.float() / 127.5 - 1  # in-memory float samples in [-1, 1], no PNG round trip
    sources = [folder, tmp_path / "imgs.npz", floats, (floats[i : i + 7] for i in range(0, 100, 7))]
    stats = [compute_stats(s, digits_features, batch_size=32) for s in sources]
    for s in stats[1:]:
        assert s.n == 100 and s.source_sha256 == stats[0].source_sha256
        np.testing.assert_allclose(s.mu, stats[0].mu, rtol=1e-6, atol=1e-7)
    assert torch.equal(float_to_uint8(floats), x)
    stats[0].save(tmp_path / "stats.npz")
    res = compare(tmp_path / "stats.npz", floats[:50], features=digits_features)
    assert res["metric"] == f"fd_{digits_features.name}" and (res["n_a"], res["n_b"]) == (100, 50)
    assert res["value"] > 0 and res["kid"] is not None
    loaded = Stats.load(tmp_path / "stats.npz")
    assert loaded.n == 100 and loaded.extractor == digits_features.key()


def test_reference_stats_cached_with_checksum(digits_features, tmp_path):
    s1 = reference_stats("digits", digits_features, split="test", cache=tmp_path)
    path = reference_path("digits", "test", 16, digits_features, cache=tmp_path)
    assert path.is_file() and s1.n == 360
    from difftools.data import build_dataset
    from difftools.metrics.fid import dataset_images

    assert s1.source_sha256 == images_sha256(dataset_images(build_dataset("digits", split="test")))[0]
    mtime = path.stat().st_mtime_ns
    s2 = reference_stats("digits", digits_features, split="test", cache=tmp_path, verify=True)
    assert path.stat().st_mtime_ns == mtime  # loaded, not recomputed
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    # a corrupted checksum is detected by verify and the statistics are recomputed
    bad = Stats.load(path)
    bad.source_sha256 = "0" * 64
    bad.save(path)
    s3 = reference_stats("digits", digits_features, split="test", cache=tmp_path, verify=True)
    assert s3.source_sha256 == s1.source_sha256 and Stats.load(path).source_sha256 == s1.source_sha256


def test_classifier_accuracy_of_real_test_images(digits_features, digits_test_uint8):
    from difftools.metrics.classifier import class_accuracy

    x, y = digits_test_uint8
    assert class_accuracy(digits_features, x, y) >= 0.95
    assert class_accuracy(digits_features, x, (y + 1) % 10) <= 0.05
    assert isinstance(digits_features, ClassifierFeatures) and digits_features.dim == 64


def test_fid_script_prints_one_json_line(digits_features, digits_test_uint8, tmp_path):
    x, _ = digits_test_uint8
    np.savez(tmp_path / "a.npz", images=x[:120].numpy())
    write_folder(tmp_path / "b", x[120:].permute(0, 2, 3, 1).numpy())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = (
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "fid.py"),
                str(tmp_path / "a.npz"),
                str(tmp_path / "b"),
                "--features",
                digits_features.path,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    assert len(out) == 1
    rec = json.loads(out[0])
    assert rec["metric"] == f"fd_{digits_features.name}" and rec["n_a"] == 120 and rec["n_b"] == 240
    direct = compare(tmp_path / "a.npz", tmp_path / "b", features=digits_features)
    assert rec["value"] == pytest.approx(direct["value"], rel=1e-6)
    assert rec["kid"] == pytest.approx(direct["kid"], rel=1e-6)


# ----------------------------------------------------------------------------- bad input to FD
def _mixed_folder(folder: Path, digits: np.ndarray) -> Path:
    """Five 16x16 digit PNGs plus a 40x40 grid image saved among them (names sort it in the middle)."""
    write_folder(folder, digits[:5])
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "0002_grid.png")
    return folder


def test_mixed_image_sizes_name_every_size_and_examples(digits_test_uint8, tmp_path):
    x = digits_test_uint8[0].permute(0, 2, 3, 1).numpy()
    folder = _mixed_folder(tmp_path / "mixed", x)
    expected = (f"{folder}: images of 2 different sizes:\n"
                "  16x16: 5 files (0000.png, 0001.png, 0002.png, ...)\n"
                "  40x40: 1 file (0002_grid.png)\n"
                "One Fréchet distance compares images of one size")
    for batch_size in (256, 2):  # inside one batch, and across batches (first batch all 16x16)
        with pytest.raises(ValueError) as err:
            list(iter_images(folder, batch_size))
        assert str(err.value).startswith(expected), str(err.value)
    # an undecodable file in the folder is named too
    (folder / "0002_grid.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(CorruptDataError, match=re.escape(f"{folder / '0002_grid.png'}: cannot decode")):
        list(iter_images(folder))


def test_sample_size_checks_in_every_statistics_path(digits_features, digits_test_uint8):
    x, _ = digits_test_uint8  # the digits classifier has 64 features
    one_image = "1 image; a Fréchet distance needs a covariance, so at least 2"
    with pytest.raises(ValueError, match=re.escape(one_image)):
        compute_stats(x[:1], digits_features)
    with pytest.raises(ValueError, match="at least 2 images"):
        gaussian_fit(np.zeros((1, 8)))
    with pytest.warns(FrechetSampleSizeWarning, match=re.escape(
            "n = 30 images is below the feature dimension 64: the covariance has rank <= 29")):
        small = compute_stats(x[:30], digits_features)
    with pytest.warns(FrechetSampleSizeWarning, match="n = 5 images is below the feature dimension 8"):
        gaussian_fit(np.random.default_rng(0).normal(size=(5, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrechetSampleSizeWarning)  # n >= d: silent
        big = compute_stats(x[:64], digits_features)
        gaussian_fit(np.random.default_rng(0).normal(size=(8, 8)))
    assert small.n == 30 and big.n == 64
    one = Stats(mu=big.mu, sigma=np.zeros_like(big.sigma), n=1, source="one.npz")
    with pytest.raises(ValueError, match=re.escape("one.npz: n = 1; a Fréchet distance needs n >= 2")):
        fd(one, big)


def _run_fid_script(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """scripts/fid.py's ``__main__`` block in this process (its error / warning handling included):
    (exit code, stdout, stderr)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["fid.py", *argv])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # the script replaces it; restored
    code = 0
    with warnings.catch_warnings():
        warnings.simplefilter("always", FrechetSampleSizeWarning)
        try:
            runpy.run_path(str(REPO / "scripts" / "fid.py"), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_fid_script_bad_inputs(digits_features, digits_test_uint8, tmp_path, monkeypatch, capsys):
    """scripts/fid.py as a user runs it: mixed sizes and a single image are errors (exit 2, one
    line, no traceback); n below the feature dimension prints the number and a warning. (The
    plain subprocess run is test_fid_script_prints_one_json_line; here the __main__ block runs
    in-process to spare three interpreter start-ups.)"""
    x, _ = digits_test_uint8
    nhwc = x.permute(0, 2, 3, 1).numpy()
    mixed = _mixed_folder(tmp_path / "mixed", nhwc)
    np.savez(tmp_path / "one.npz", images=nhwc[:1])
    np.savez(tmp_path / "small.npz", images=nhwc[:30])
    np.savez(tmp_path / "ref.npz", images=nhwc[100:300])
    ref, features = str(tmp_path / "ref.npz"), ["--features", digits_features.path]

    code, out, err = _run_fid_script([str(mixed), ref, *features], monkeypatch, capsys)
    assert code == 2 and out == "", err
    assert err.startswith(f"error: {mixed}: images of 2 different sizes:\n  16x16: 5 files"), err
    assert "40x40: 1 file (0002_grid.png)" in err and "Traceback" not in err

    code, out, err = _run_fid_script([str(tmp_path / "one.npz"), ref, *features], monkeypatch, capsys)
    assert code == 2 and out == "", err
    assert err.strip() == (f"error: {tmp_path / 'one.npz'}: 1 image; a Fréchet distance needs a "
                           "covariance, so at least 2 images per set (and at least the feature "
                           "dimension, 64, to be meaningful)")

    code, out, err = _run_fid_script([str(tmp_path / "small.npz"), ref, *features], monkeypatch, capsys)
    assert code == 0, err
    rec = json.loads(out.strip())
    assert rec["n_a"] == 30 and rec["n_b"] == 200 and np.isfinite(rec["value"])
    # (pytest also shows third-party DeprecationWarnings, which a plain run hides: look for the line)
    assert (f"warning: {tmp_path / 'small.npz'}: n = 30 images is below the feature dimension 64: the "
            "covariance has rank <= 29, so a Fréchet distance from it is not meaningful (biased, and it "
            "changes with n). Use n >= 64 and compare distances only at equal n.") in err.splitlines(), err


def test_fd_names_never_fid_for_classifier(digits_features):
    assert digits_features.metric.startswith("fd_") and "fid" not in digits_features.metric
    assert feat_mod.build_extractor(digits_features) is digits_features
