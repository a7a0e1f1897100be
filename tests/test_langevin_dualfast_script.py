"""scripts/langevin_dualfast_gpu.py on CPU: the smoke run, a real (tiny, untrained) checkpoint with a
reference statistics file, equal-NFE bookkeeping, and the error for mismatched reference features."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    path = REPO / "scripts" / "langevin_dualfast_gpu.py"
    spec = importlib.util.spec_from_file_location("langevin_dualfast_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_tables_at_equal_nfe(tmp_path):
    mod = load_script()
    out = mod.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "langevin_dualfast.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    lang = [r for r in saved["rows"] if r["part"] == "langevin"]
    assert len(lang) == 3 and {r["nfe"] for r in lang} == {8 + 1}  # equal NFE, + the final denoising
    assert [r["steps"] for r in lang] == [8, 5, 4]
    assert "LMLCorrector" in lang[2]["hooks"][0] and "LangevinCorrector" in lang[1]["hooks"][0]
    df = [r for r in saved["rows"] if r["part"] == "dualfast"]
    assert [r["dualfast"] for r in df] == ["off", "on"] and {r["nfe"] for r in df} == {5 + 1}
    assert df[0]["fd"] != df[1]["fd"]  # DualFast acts on the random model
    assert all(r["metric"] == "fd_random_projection" and r["n"] == 16 for r in saved["rows"])
    md = (tmp_path / "langevin_dualfast.md").read_text()
    assert "| langevin | NFE 8 |" in md and "| dualfast | NFE 5 |" in md


def test_checkpoint_and_reference_file(tmp_path):
    from difftools.checkpoint import save_checkpoint
    from difftools.metrics.fid import compute_stats
    from difftools.models.dit import DiT
    from difftools.process import Flow

    mod = load_script()
    net = mod.smoke_loaded().model
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "step_0", net, process=Flow(),
                           prediction="flow", config={"data": {"name": "digits", "image_size": 8}}, step=0)
    assert isinstance(net, DiT)
    ext = mod.RandomProjection(device="cpu")
    ref = compute_stats(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8), ext)
    ref.save(tmp_path / "ref.npz")
    out = mod.main(["--smoke", "--ckpt", str(ckpt), "--reference", str(tmp_path / "ref.npz"),
                    "--parts", "dualfast", "--out", str(tmp_path / "out")])
    assert out["protocol"]["checkpoint"] == str(ckpt) and out["protocol"]["reference_n"] == 32
    assert len(out["rows"]) == 2
    # the same reference statistics under another feature space are refused, naming the file
    ref.extractor = "inception_v3_other"
    ref.save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="other.npz holds statistics of features 'inception_v3_other'"):
        mod.main(["--smoke", "--ckpt", str(ckpt), "--reference", str(tmp_path / "other.npz"),
                  "--out", str(tmp_path / "out2")])


def test_rows_are_saved_as_they_finish(tmp_path, monkeypatch):
    """A run killed mid-table (the device's time limit) leaves every finished row on disk."""
    mod = load_script()
    real_score, calls = mod.score, []

    def score_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("time limit")
        return real_score(*a, **k)

    monkeypatch.setattr(mod, "score", score_then_stop)
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "langevin_dualfast.json").read_text())
    assert [r["label"] for r in saved["rows"]] == ["dpmpp_2m", "dpmpp_2m + first-order Langevin (0.1)"]
    assert saved["protocol"]["rows_planned"] == 5
    assert "| langevin | NFE 8 |" in (tmp_path / "langevin_dualfast.md").read_text()
