"""Data and weights as a user finds them: torchvision's download layouts, the official CIFAR-10 binary
version, missing-file messages that name every path tried and point at docs/data.md, and no message
that sends a user to this repository's development folders."""

from __future__ import annotations

import ast
import gzip
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from difftools import files
from difftools.data import CorruptDataError, build_dataset
from difftools.data.cifar10 import UnsafePickleError
from difftools.data.text import find_text
from difftools.models.autoencoders import build_autoencoder, default_taef2_dir

REPO = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, magic: int, arr: np.ndarray, gz: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


# ------------------------------------------------------------------ MNIST / Fashion-MNIST layouts


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_download_layout_is_found(tmp_path, name, folder):
    """torchvision's ``<root>/<MNIST|FashionMNIST>/raw/``: images uncompressed (as torchvision leaves
    them after extracting), labels still gzipped; the pixels and labels come back exactly."""
    raw = tmp_path / folder / "raw"
    images = (np.arange(2 * 28 * 28).reshape(2, 28, 28) * 7) % 256
    _write_idx(raw / "train-images-idx3-ubyte", 2051, images, gz=False)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", 2049, np.array([9, 4]), gz=True)
    ds = build_dataset(name, root=tmp_path)
    assert ds.labels.tolist() == [9, 4]
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images).to(torch.uint8))
    x, _ = ds[1]
    assert x[0, 0, 0].item() == pytest.approx(2 * ((784 * 7) % 256) / 255 - 1, abs=1e-6)


def test_missing_idx_names_every_path_tried_and_docs(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTOOLS_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("fashion_mnist", split="test")
    msg = str(err.value)
    tried = [tmp_path / f / "t10k-images-idx3-ubyte" for f in ("fashion-mnist", "FashionMNIST/raw")]
    for path in tried:  # ours and torchvision's, each gzipped or not
        assert f"\n  {path}.gz\n" in msg and f"\n  {path}\n" in msg
    assert f"(now DIFFTOOLS_DATA={tmp_path})" in msg and "holds fashion-mnist/" in msg
    assert "See docs/data.md" in msg and "../shared" not in msg and "SOURCES" not in msg


def test_missing_text_with_root_names_the_path_and_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        find_text(tmp_path / "empty")
    msg = str(err.value)
    assert msg.startswith(f"tinyshakespeare: no text file (text/tinyshakespeare.txt) found. Looked for:\n"
                          f"  {tmp_path / 'empty' / 'text' / 'tinyshakespeare.txt'}\n")
    assert "holds text/ with root=<folder> (Hydra: data.root=<folder>)" in msg
    assert f"(now root={tmp_path / 'empty'})" in msg and "docs/data.md" in msg


def test_missing_data_with_nothing_set_says_so(tmp_path, monkeypatch):
    """No root= and no DIFFTOOLS_DATA: the message says neither is set (the paths tried are then only
    the development fallback, which a user should not be told to fill)."""
    monkeypatch.delenv("DIFFTOOLS_DATA", raising=False)
    monkeypatch.setattr(files, "_CHECKOUT", tmp_path / "checkout")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("cifar10", split="test")
    msg = str(err.value)
    assert f"\n  {tmp_path / 'shared' / 'data' / 'cifar10' / 'cifar-10-batches-bin'}\n" in msg
    assert "DIFFTOOLS_DATA environment variable (neither is set now). See docs/data.md" in msg


# ---------------------------------------------------------------------- CIFAR-10 binary version


def _cifar_records(images_nhwc: np.ndarray, labels) -> bytes:
    """The official binary record layout, written independently of the reader: label byte, then the
    red, green and blue 32x32 planes."""
    out = bytearray()
    for img, label in zip(images_nhwc, labels, strict=True):
        out.append(label)
        for c in range(3):
            out += img[:, :, c].tobytes()
    return bytes(out)


def test_cifar10_binary_version_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-10-batches-bin"  # the folder the official archive unpacks to
    folder.mkdir()
    train = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    train_labels = [int(v) for v in rng.integers(0, 10, 10)]
    for i in range(5):  # two records per batch file
        part = slice(2 * i, 2 * i + 2)
        (folder / f"data_batch_{i + 1}.bin").write_bytes(_cifar_records(train[part], train_labels[part]))
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    (folder / "test_batch.bin").write_bytes(_cifar_records(test, [0, 9, 5]))

    ds = build_dataset("cifar10", root=tmp_path)
    assert torch.equal(ds.images, torch.from_numpy(train).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == train_labels
    ds = build_dataset("cifar10", root=tmp_path, split="test")
    assert torch.equal(ds.images, torch.from_numpy(test).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == [0, 9, 5]
    x, _ = ds[2]
    assert x[1, 4, 7].item() == pytest.approx(2 * int(test[2, 4, 7, 1]) / 255 - 1, abs=1e-6)


def test_cifar10_binary_truncated_or_incomplete_names_the_file(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    path = folder / "test_batch.bin"
    path.write_bytes(_cifar_records(np.zeros((2, 32, 32, 3), np.uint8), [1, 2])[:-100])  # cut short
    with pytest.raises(CorruptDataError) as err:
        build_dataset("cifar10", root=tmp_path, split="test")
    assert str(err.value) == (
        f"{path}: 6046 bytes is not a whole number of 3073-byte records (1 label byte + 3072 pixel "
        "bytes); the file is truncated or damaged: replace it (see docs/data.md)"
    )
    path.write_bytes(_cifar_records(np.zeros((2, 32, 32, 3), np.uint8), [1, 200]))  # not a label
    with pytest.raises(CorruptDataError, match=re.escape(f"{path}: record 1 has label 200")):
        build_dataset("cifar10", root=tmp_path, split="test")
    # a train split with a batch file missing names that file, not a bare open() error
    (folder / "data_batch_1.bin").write_bytes(_cifar_records(np.zeros((1, 32, 32, 3), np.uint8), [0]))
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("cifar10", root=tmp_path)
    assert str(folder / "data_batch_2.bin") in str(err.value)
    assert str(folder / "data_batch_1.bin") not in str(err.value) and "docs/data.md" in str(err.value)


def test_cifar10_python_batch_damaged_or_unsafe_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    path = folder / "test_batch"
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    path.write_bytes(pickle.dumps(batch)[:-40])  # an interrupted copy
    with pytest.raises(CorruptDataError, match=re.escape(f"{path}: cannot read this CIFAR batch")):
        build_dataset("cifar10", root=tmp_path, split="test")
    path.write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(UnsafePickleError, match=re.escape(f"{path}: refusing to unpickle builtins.print")):
        build_dataset("cifar10", root=tmp_path, split="test")


# --------------------------------------------------------------------------------- TAEF2 weights


def test_taef2_weights_missing_names_files_and_docs(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTOOLS_DATA", str(tmp_path))
    assert default_taef2_dir() == tmp_path / "vae"
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "taef2_encoder.pth").write_bytes(b"")  # the decoder is missing
    with pytest.raises(FileNotFoundError) as err:
        build_autoencoder("taef2")
    msg = str(err.value)
    vae = tmp_path / "vae"
    assert msg.startswith("TAEF2 weights not found. Looked for:\n"
                          f"  {vae / 'taef2_encoder.pth'}\n  {vae / 'taef2_decoder.pth'}\n")
    assert f"(now DIFFTOOLS_DATA={tmp_path})" in msg and "vae.path=<folder>" in msg
    assert "See docs/data.md" in msg and "../shared" not in msg
    with pytest.raises(FileNotFoundError, match=re.escape(f"(now path={tmp_path / 'x'})")):
        build_autoencoder("taef2", path=tmp_path / "x")


# ------------------------------------------------------------- no development paths in messages

FORBIDDEN = ("../shared", "shared/wheels", "SOURCES.md")


def _string_literals(path: Path):
    """(line, text) of every string constant in a Python file: messages, help texts, docstrings,
    the constant parts of f-strings."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def _hits(where: str, text: str) -> list[str]:
    return [f"{where}: {bad}" for bad in FORBIDDEN if bad in text]


def test_no_user_facing_text_points_at_the_development_layout():
    """Package sources, recipes, scripts, Hydra configs and README must not send a user to this
    repository's development folders (../shared/data, ../shared/wheels, SOURCES.md): a user has
    docs/data.md, root= / data.root= and DIFFTOOLS_DATA. (The silent fallback in
    difftools.files.data_roots builds its path from parts, so no literal names it.)"""
    hits = []
    for package in ("difftools", "samplers", "train", "scripts"):
        for path in sorted((REPO / package).rglob("*.py")):
            for line, text in _string_literals(path):
                hits += _hits(f"{path.relative_to(REPO)}:{line}", text)
    texts = [REPO / "README.md", *sorted((REPO / "conf").rglob("*.yaml"))]
    # docs/gpu_runbook.md is the developers' page for this repository's own GPU machine, where the
    # development folders are what a call carries or leaves behind
    texts += sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "gpu_runbook.md")
    for path in texts:
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            # docs may cite the development checkpoint a measurement was made on (../shared/models)
            text = text.replace("../shared/models/", "").replace("../shared/ARCHITECTURE.md", "")
            hits += _hits(f"{path.relative_to(REPO)}:{line}", text)
    assert not hits, "development paths in user-facing text:\n" + "\n".join(hits)
    assert len(list((REPO / "difftools").rglob("*.py"))) > 50  # the walk saw the package
