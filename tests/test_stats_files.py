"""Evaluation from statistics alone (issue 20, item 4): ``scripts/fid.py --save-stats`` writes a
dataset's statistics with their protocol; evaluation with that file and the dataset's folder absent
gives the same numbers as with the dataset; a file of another feature space or image size is refused
with a message naming the file, both sides and how to remake it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from difftools.data import build_dataset
from difftools.data.base import DatasetInfo
from difftools.files import file_sha256
from difftools.metrics.classifier import FitResult, dataset_tensors, default_classifier, save_classifier
from difftools.metrics.evaluate import evaluate_checkpoint
from difftools.metrics.features import ClassifierFeatures
from difftools.metrics.reference import pick_reference, reference_from_file, reference_stats
from difftools.metrics.stats import Stats, StatsFileError, StatsMismatchError
from difftools.models.classifier import Classifier
from difftools.testing import save_smoke_checkpoint

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 100

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"stats_test_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_classifier(path: Path, seed: int) -> Path:
    """A random (untrained) RGB 16px classifier checkpoint: a real, cheap feature space."""
    torch.manual_seed(seed)
    clf = Classifier(3, 16, 10, widths=(4, 8), depth=1, name="clf_tiny").eval()
    info = DatasetInfo("image_folder", 3, 16, 10, tuple(str(k) for k in range(10)))
    return save_classifier(path, clf, info, FitResult(0.0, 0.0, 0, 0.0))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An image-folder dataset (100 digits as RGB PNGs, one folder per class), two classifiers with
    different weights, a smoke DiT checkpoint, an empty folder, and the dataset's statistics file
    (made by scripts/fid.py --save-stats, KID rows kept)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stats_files")
    x, y = dataset_tensors(build_dataset("digits", split="test"))
    data = root / "data"
    for i in range(N_IMAGES):
        (data / str(int(y[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, 0].numpy()).convert("RGB").save(data / str(int(y[i])) / f"{i:03d}.png")
    (root / "empty").mkdir()
    ns = SimpleNamespace(root=root, data=data, empty=root / "empty", clf_a=tiny_classifier(root / "clf_a", 0),
                         clf_b=tiny_classifier(root / "clf_b", 1),
                         ckpt=save_smoke_checkpoint(root / "ckpt", perturb=0.1))
    ns.ext_a = ClassifierFeatures.from_checkpoint(ns.clf_a)
    ns.ext_b = ClassifierFeatures.from_checkpoint(ns.clf_b)
    ns.stats_a = root / "stats_a.npz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFTOOLS_CACHE", str(root / "fid_cache"))
        ns.saved = load_script("fid").main([
            "dataset:image_folder:train", "--data-root", str(data), "--image-size", "16",
            "--features", str(ns.clf_a), "--save-stats", str(ns.stats_a), "--kid-features", "10000"])
    return ns


def evaluate(env, **kw):
    opts = dict(num_samples=40, steps=2, dataset="image_folder", image_size=16, features=str(env.clf_a),
                precision="fp32", device="cpu", log=None)
    return evaluate_checkpoint(env.ckpt, **{**opts, **kw})


def test_saved_statistics_equal_the_ones_computed_from_the_dataset(env, tmp_path, monkeypatch):
    direct = reference_stats("image_folder", env.ext_a, split="train", image_size=16, root=env.data,
                             cache=tmp_path / "direct")
    saved = Stats.load(env.stats_a)
    np.testing.assert_array_equal(saved.mu, direct.mu)
    np.testing.assert_array_equal(saved.sigma, direct.sigma)
    np.testing.assert_array_equal(saved.feats, direct.feats)
    assert saved.n == direct.n == N_IMAGES and saved.source_sha256 == direct.source_sha256
    # the protocol: feature space and its full weights hash, resize path, dataset / split / size
    assert saved.extractor == env.ext_a.key() and saved.metric == "fd_clf_tiny"
    assert saved.protocol["weights_sha256"] == file_sha256(env.clf_a / "ema.safetensors")
    assert saved.protocol["resize"].startswith("torch bilinear, antialiased, to 16px")
    assert saved.dataset == {"name": "image_folder", "split": "train", "image_size": 16, "max_items": None}
    assert env.saved["n"] == N_IMAGES and env.saved["kid_features"] == N_IMAGES
    # by default the file holds mean and covariance only (small; no KID rows)
    monkeypatch.setenv("DIFFTOOLS_CACHE", str(env.root / "fid_cache"))
    rec = load_script("fid").main([
        "dataset:image_folder:train", "--data-root", str(env.empty), "--image-size", "16",
        "--features", str(env.clf_a), "--save-stats", str(tmp_path / "s.npz")])
    small = Stats.load(tmp_path / "s.npz")
    assert small.feats is None and rec["kid_features"] == 0 and rec["bytes"] < 4000
    np.testing.assert_array_equal(small.sigma, direct.sigma)  # read from the cache: the data folder is empty


def test_evaluation_from_statistics_alone_equals_evaluation_with_the_dataset(env, tmp_path):
    with_data = evaluate(env, data_root=str(env.data), cache=tmp_path / "c1")
    # the folder really is needed without a statistics file ...
    with pytest.raises(FileNotFoundError, match=f"image_folder: no images .* of {env.empty}"):
        evaluate(env, data_root=str(env.empty), cache=tmp_path / "c2")
    # ... and is not with one
    alone = evaluate(env, data_root=str(env.empty), stats_files=[env.stats_a], cache=tmp_path / "c3")
    metric = with_data["metric"]
    assert metric == "fd_clf_tiny" and with_data[metric] > 0
    assert alone[metric] == with_data[metric] and alone["kid"] == with_data["kid"]
    assert alone["n_reference"] == with_data["n_reference"] == N_IMAGES

    # scripts/sample.py, same samples, metrics.stats_files and an empty data root
    mod = load_script("sample")
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.pop("hydra")
    cfg.merge_with(OmegaConf.create({
        "ckpt": str(env.ckpt), "steps": 2, "num_samples": 40, "precision": "fp32", "progress": False,
        "save": {"png": False, "grid": False, "npz": False},
        "metrics": {"dataset": "image_folder", "image_size": 16, "data_root": str(env.empty),
                    "features": [str(env.clf_a)], "stats_files": [str(env.stats_a)]},
    }))
    rec = mod.run(cfg, tmp_path)
    assert rec[metric] == pytest.approx(with_data[metric], rel=1e-9)
    assert rec["metrics"][metric]["n_reference"] == N_IMAGES


def test_statistics_of_another_feature_space_size_or_format_are_refused(env, tmp_path):
    with pytest.raises(StatsMismatchError) as err:
        evaluate(env, features=str(env.clf_b), data_root=str(env.empty), stats_files=[env.stats_a],
                 cache=tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{env.stats_a}: statistics were computed with features '{env.ext_a.key()}' (from "
                          f"{env.clf_a}, weights sha256 {env.ext_a.sha256})")
    assert f"but the feature extractor is '{env.ext_b.key()}' (weights sha256 {env.ext_b.sha256})" in msg
    assert f"--save-stats {env.stats_a}" in msg
    with pytest.raises(StatsMismatchError, match="image_size 32 was asked for"):
        reference_from_file(env.stats_a, env.ext_a, dataset="image_folder", image_size=32)
    with pytest.raises(StatsMismatchError, match="'cifar10' was asked for"):
        reference_from_file(env.stats_a, env.ext_a, dataset="cifar10")
    images = tmp_path / "images.npz"
    np.savez(images, images=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(StatsFileError, match=f"{images} is not a statistics file: it holds \\['images'\\]"):
        reference_from_file(images, env.ext_a)
    # scripts/fid.py compares images with the statistics only in their own feature space
    with pytest.raises(StatsMismatchError, match="statistics were computed with features"):
        load_script("fid").main([str(env.data), str(env.stats_a), "--features", str(env.clf_b)])


def test_pick_reference_takes_the_file_of_the_feature_space(env, tmp_path):
    stats_b = reference_stats("image_folder", env.ext_b, image_size=16, root=env.data, cache=tmp_path)
    stats_b.save(tmp_path / "b.npz", features=False)
    got = pick_reference([env.stats_a, tmp_path / "b.npz"], env.ext_b, dataset="image_folder", image_size=16)
    np.testing.assert_array_equal(got.mu, stats_b.mu)
    shutil.copy(env.stats_a, tmp_path / "a2.npz")
    with pytest.raises(StatsMismatchError) as err:
        pick_reference([env.stats_a, tmp_path / "a2.npz"], env.ext_b)
    assert str(err.value).splitlines()[:3] == [
        f"none of the 2 statistics files was made with features '{env.ext_b.key()}':",
        f"  {env.stats_a}: features '{env.ext_a.key()}'",
        f"  {tmp_path / 'a2.npz'}: features '{env.ext_a.key()}'",
    ]


def test_cached_reference_and_classifier_need_no_dataset(env, tmp_path):
    """With the image size known, the caches are read before (instead of) building the dataset."""
    first = reference_stats("image_folder", env.ext_a, image_size=16, root=env.data, cache=tmp_path)
    again = reference_stats("image_folder", env.ext_a, image_size=16, root=env.empty, cache=tmp_path)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    shutil.copytree(env.clf_a, tmp_path / "classifiers" / "mnist_16px")
    clf = default_classifier("mnist", 16, root=env.empty, cache=tmp_path / "classifiers", log=None)
    assert clf.sha256 == env.ext_a.sha256
    with pytest.raises(FileNotFoundError, match="mnist"):  # not cached: it would train, and needs the data
        default_classifier("mnist", 20, root=env.empty, cache=tmp_path / "classifiers", log=None)
