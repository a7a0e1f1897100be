"""scripts/gpu_preflight.py: the problems a device call would otherwise meet minutes in are named at once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_preflight", REPO / "scripts" / "gpu_preflight.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_scripts_and_paths_pass(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .gpu/ here (the checkout's own may be an older copy)
    mod = load_script()
    code = mod.main(["--scripts", str(REPO / "scripts" / "langevin_dualfast_gpu.py"),
                     "--paths", str(REPO / "conf" / "nft.yaml")])
    out = capsys.readouterr().out
    assert code == 0 and "preflight: ok" in out and "imported" in out


def test_missing_module_path_and_cuda_are_each_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mod = load_script()
    bad = tmp_path / "needs_a_wheel.py"
    bad.write_text("import not_installed_anywhere_xyz\n")
    monkeypatch.setitem(mod.LAZY, "also_not_installed_xyz", "a wheel nobody carried")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code = mod.main(["--cuda", "--scripts", str(bad), "--paths", str(tmp_path / "carried_model")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"script {bad}: No module named 'not_installed_anywhere_xyz'" in err
    assert "import also_not_installed_xyz" in err and "(comes from a wheel nobody carried)" in err
    assert f"path {tmp_path / 'carried_model'}: not found (is it in the call's carry list?)" in err
    assert "--cuda: torch sees no CUDA device" in err


def test_a_stale_setup_copy_is_named(tmp_path, capsys, monkeypatch):
    """.gpu/setup.sh is a copy made by scripts/gpu_prepare.sh; an old one lacks `left`, which the runbook's
    commands call."""
    mod = load_script()
    (tmp_path / ".gpu").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".gpu" / "setup.sh").write_bytes((REPO / "scripts" / "gpu_setup.sh").read_bytes())
    assert mod.main([]) == 0
    (tmp_path / ".gpu" / "setup.sh").write_text("export PYTHONPATH=/tmp/site:$PWD\n")
    assert mod.main([]) == 1
    assert ".gpu/setup.sh differs from scripts/gpu_setup.sh: run `bash scripts/gpu_prepare.sh`" in (
        capsys.readouterr().err)
