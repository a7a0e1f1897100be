"""Checkpoint directories: atomic writes, interrupted writes, corrupt files, pruning, load()."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from test_training import _isolated, make_trainer, small_digits, tiny_dit  # noqa: F401 (autouse fixture)

import difftools
from difftools import checkpoint as ckpt_io
from difftools.checkpoint import CheckpointError
from difftools.models.dit import DiT
from difftools.process import VP, Flow
from difftools.training import Trainer, TrainerConfig


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        return model.eval()(x, t, torch.tensor([1, 2]))


def _perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_save_checkpoint_and_load_round_trip(tmp_path):
    model = _perturbed(tiny_dit(), 1)
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    path = ckpt_io.save_checkpoint(tmp_path / "step_1", model, config={"lr": 3e-4}, ema_state=ema,
                                   process=VP("cosine"), prediction="eps", step=1,
                                   dataset_info={"name": "digits", "num_classes": 10})
    loaded = difftools.load(tmp_path, use_ema=False)  # via the `latest` pointer
    assert loaded.path == path and loaded.step == 1 and loaded.prediction == "eps"
    assert loaded.process.schedule == "cosine" and loaded.config["lr"] == 3e-4
    assert not loaded.model.training
    torch.testing.assert_close(_outputs(loaded.model), _outputs(model), rtol=0, atol=0)
    ema_model = difftools.load(path).model
    assert torch.equal(ema_model.x_embedder.proj.bias, model.x_embedder.proj.bias + 1.0)


def test_every_accepted_path_form_resolves_to_the_newest_checkpoint(tmp_path):
    model = tiny_dit()
    for step in (1, 2):
        ckpt_io.save_checkpoint(tmp_path / "checkpoints" / f"step_{step}", model, config={}, step=step,
                                process=Flow(), prediction="flow")
    newest = tmp_path / "checkpoints" / "step_2"
    # run dir, checkpoints/ dir, the `latest` pointer file itself, and the checkpoint dir
    for given in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "latest", newest):
        assert ckpt_io.resolve_checkpoint(given) == newest, given
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ckpt_io.resolve_checkpoint(tmp_path / "checkpoints" / "step_2" / "config.yaml")


def test_atomic_directory_leaves_old_version_on_error(tmp_path):
    target = tmp_path / "ckpt"
    with ckpt_io.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with ckpt_io.atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("new, half writ")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # temp dir cleaned up
    with ckpt_io.atomic_directory(target) as tmp:  # replacing a complete directory works too
        (tmp / "b.txt").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


class _CrashBeforeRename(Trainer):
    """Simulates the process dying after writing step 8's files but before the rename."""

    def _before_commit(self, tmp):
        if self.step == 8:
            (tmp / "model.safetensors").write_bytes(b"\x00" * 10)  # and a half-written file
            raise KeyboardInterrupt("killed mid-write")


def _crash_trainer(out, **kw):
    process = Flow()
    from difftools.losses import DenoisingLoss


    cfg = TrainerConfig(batch_size=32, max_steps=8, lr=1e-3, warmup_steps=2, log_every=4, ckpt_every=4,
                        keep_last=0, sample_every=0, progress=False, tensorboard=False, ema_decay=0.9,
                        device="cpu", **kw)
    return _CrashBeforeRename(tiny_dit(), DenoisingLoss(process, "flow"), small_digits(), cfg, out,
                              process=process, prediction="flow")


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _crash_trainer(tmp_path).train()
    root = tmp_path / "checkpoints"
    assert (root / ".step_0000008.partial").is_dir()  # the crash left a partial temp dir ...
    assert ckpt_io.read_latest(root).name == "step_0000004"  # ... that nothing points to
    loaded = difftools.load(tmp_path)
    assert loaded.step == 4 and all(torch.isfinite(p).all() for p in loaded.model.parameters())
    # resuming from `latest` works and the next write replaces the stale partial directory
    tr = make_trainer(tmp_path, resume="auto")
    result = tr.train()
    assert result.step == 8 and len(result.losses) == 4
    assert not (root / ".step_0000008.partial").exists()
    assert ckpt_io.read_latest(root).name == "step_0000008"


def test_failed_rename_keeps_latest_on_previous(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, max_steps=4, ckpt_every=2)
    real_replace = os.replace

    def flaky_replace(src, dst):
        if str(dst).endswith("step_0000004"):
            raise OSError("EIO: simulated failure during rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_io.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated"):
        tr.train()
    monkeypatch.undo()
    assert ckpt_io.read_latest(tmp_path / "checkpoints").name == "step_0000002"
    assert difftools.load(tmp_path).step == 2


def test_keep_last_prunes_old_checkpoints(tmp_path):
    make_trainer(tmp_path, max_steps=8, ckpt_every=2, keep_last=2).train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0000006", "step_0000008", "vetted"]
    assert (tmp_path / "checkpoints" / "vetted").read_text() == "step_0000006\n"  # step 8 has no step 9


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    make_trainer(out, max_steps=2, ckpt_every=2).train()
    return out / "checkpoints" / "step_0000002"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_give_clear_error(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "step_0000002")
    data = (ckpt / "ema.safetensors").read_bytes()
    (ckpt / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt weights file .*ema\.safetensors"):
        difftools.load(ckpt)


def test_missing_and_garbled_files_give_clear_errors(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "a")
    (ckpt / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="missing config.yaml"):
        difftools.load(ckpt)
    ckpt = _copy(trained, tmp_path / "b")
    (ckpt / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        difftools.load(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        difftools.load(tmp_path / "nope")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "latest").write_text("step_0000099\n")
    with pytest.raises(CheckpointError, match="names step_0000099"):
        difftools.load(tmp_path / "c")


def test_corrupt_training_state_refuses_to_resume(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "run" / "checkpoints" / "step_0000002")
    (ckpt / "state" / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"corrupt state file .*optimizer\.pt"):
        make_trainer(tmp_path / "run2", resume=str(ckpt)).train()
    (ckpt / "state" / "trainer.json").unlink()
    with pytest.raises(CheckpointError, match="missing state/trainer.json"):
        make_trainer(tmp_path / "run3", resume=str(ckpt)).train()


def test_resume_with_other_global_batch_is_refused(trained, tmp_path):
    with pytest.raises(CheckpointError, match="global batch 32"):
        make_trainer(tmp_path, resume=str(trained), batch_size=16).train()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_never_unpickles_code(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "run" / "checkpoints" / "step_0000002")
    with open(ckpt / "state" / "scheduler.pt", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    torch.save({"x": _Evil()}, ckpt / "state" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        ckpt_io.torch_load(ckpt / "state" / "optimizer.pt")
    cfg = (ckpt / "config.yaml").read_text().replace("difftools.models.dit:DiT", "os:system")
    (ckpt / "config.yaml").write_text(cfg)
    with pytest.raises(CheckpointError, match="refusing model_class"):
        difftools.load(ckpt)


def test_state_dict_mismatch_is_reported(tmp_path):
    model = tiny_dit()
    ckpt_io.save_checkpoint(tmp_path / "x", model)
    cfg = (tmp_path / "x" / "config.yaml").read_text().replace("depth: 2", "depth: 3")
    (tmp_path / "x" / "config.yaml").write_text(cfg)
    with pytest.raises(CheckpointError, match="missing keys"):
        difftools.load(tmp_path / "x")
    assert isinstance(model, DiT)
