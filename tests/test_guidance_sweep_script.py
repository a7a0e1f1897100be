"""scripts/guidance_sweep.py on CPU (--smoke): the real images it scores against come from --data-split,
and its tables are on disk after every row (a GPU call stopped by its time limit keeps them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from difftools.data import build_dataset
from difftools.images import float_to_uint8

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("guidance_sweep", REPO / "scripts" / "guidance_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def split_mean(split: str) -> float:
    """Mean grey level in [0, 1] of a split's images as uint8 (the form the script keeps them in)."""
    ds = build_dataset("digits", split=split)
    return (float_to_uint8(torch.stack([ds[i][0] for i in range(len(ds))])).double() / 255).mean().item()


def test_data_split_test_scores_against_the_whole_test_split(tmp_path):
    mod = load_script()
    test = build_dataset("digits", split="test")
    # n above the split's size: the "n random real images" are then all of them, in any order
    out = mod.main(["--smoke", "--data-split", "test", "--n", str(len(test) + 8), "--steps", "2",
                    "--scales", "1.5", "--out", str(tmp_path)])
    proto = out["protocol"]
    assert proto["data_split"] == "test"
    assert proto["data_stats"]["pixel_mean"] == pytest.approx(split_mean("test"), abs=1e-6)
    assert abs(split_mean("train") - split_mean("test")) > 1e-3  # the two splits are told apart
    saved = json.loads((tmp_path / "guidance.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    assert "Data (test split)" in (tmp_path / "guidance.md").read_text()


def test_rows_are_saved_as_they_finish(tmp_path, monkeypatch):
    mod = load_script()
    real_fd, calls = mod.fd, []

    def fd_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("time limit")
        return real_fd(*a, **k)

    monkeypatch.setattr(mod, "fd", fd_then_stop)
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--smoke", "--n", "8", "--steps", "2", "--scales", "1.5", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "guidance.json").read_text())
    assert [(r["method"], r["w"]) for r in saved["rows"]] == [("none", 1.0), ("cfg", 1.5)]
    assert saved["protocol"]["data_split"] == "train"
