"""Checkpoint directories: atomic writes, interrupted writes, corrupt files, pruning, load()."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_training import _isolated, make_trainer, small_digits, tiny_dit  # noqa: F401 (autouse fixture)

import difftools
from difftools import checkpoint as ckpt_io
from difftools.checkpoint import CheckpointError
from difftools.models.dit import DiT
from difftools.process import VP, Flow
from difftools.training import DenoisingObjective, Trainer, TrainerConfig


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
    dataset = small_digits()
    objective = DenoisingObjective(tiny_dit(), DenoisingLoss(process, "flow"), process, "flow",
                                   dataset_info=dataset.info)
    return _CrashBeforeRename(objective, cfg, out, dataset=dataset)


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
    ckpt_io.save_checkpoint(tmp_path / "x", model, process=Flow(), prediction="flow")
    cfg = (tmp_path / "x" / "config.yaml").read_text().replace("depth: 2", "depth: 3")
    (tmp_path / "x" / "config.yaml").write_text(cfg)
    with pytest.raises(CheckpointError, match="missing keys"):
        difftools.load(tmp_path / "x")
    assert isinstance(model, DiT)


# ------------------------------------------------------------------ a checkpoint never runs code
def _save_tiny(path, seed: int = 0, **kw) -> Path:
    opts = dict(process=Flow(), prediction="flow", step=1)
    opts.update(kw)
    return ckpt_io.save_checkpoint(path, _perturbed(tiny_dit(), seed), **opts)


def _edit_node(ckpt: Path, **changes) -> None:
    import yaml

    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["checkpoint"].update(changes)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_model_class_payload_runs_no_code(tmp_path, monkeypatch):
    """The payload of issue 11: os.system reached through difftools.checkpoint's own `import os`."""
    ckpt = _save_tiny(tmp_path / "step_1")
    _edit_node(ckpt, model_class="difftools.checkpoint:os.system", model={"command": "touch pwned.marker"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.yaml: .*refusing model_class "
                                              r"'difftools\.checkpoint:os\.system': not a class registered"):
        difftools.load(ckpt)
    assert not (tmp_path / "pwned.marker").exists()


def test_precond_net_class_payload_runs_no_code(tmp_path, monkeypatch):
    from difftools.models.precond import EDMPrecond
    from difftools.models.registry import UnregisteredClassError

    ckpt = _save_tiny(tmp_path / "step_1")
    _edit_node(ckpt, model_class="difftools.models.precond:EDMPrecond",
               model={"net": {"command": "touch pwned.marker"}, "net_class": "difftools.checkpoint:os.system",
                      "process": {"kind": "Flow"}})
    monkeypatch.chdir(tmp_path)
    refused = r"refusing net_class 'difftools\.checkpoint:os\.system'"
    with pytest.raises(CheckpointError, match=rf"config\.yaml: {refused}"):
        difftools.load(ckpt)
    with pytest.raises(UnregisteredClassError, match=refused):  # built directly: no file to name
        EDMPrecond({"command": "touch pwned.marker"}, {"kind": "Flow"},
                   net_class="difftools.checkpoint:os.system")
    assert not (tmp_path / "pwned.marker").exists()


@pytest.mark.parametrize("name", [
    "os:system",                                  # outside difftools
    "difftools.models.dit:torch.nn.Linear",       # an nn.Module reached through a module's imports
    "difftools.models.dit:DiT.__init__",          # a dotted attribute walk from a registered class
    "difftools.models.dit:DiTBlock",              # an nn.Module of difftools that is not registered
    "difftools.models.dit:DiT ",                  # not the exact name
])
def test_only_registered_classes_are_rebuilt(tmp_path, name):
    ckpt = _save_tiny(tmp_path / "step_1")
    _edit_node(ckpt, model_class=name)
    # every registered name is listed (classes of other packages, e.g. difftools.editing, come first)
    registered = (r"(\S+, )*difftools\.models\.autoencoders\.trainable:TrainableAutoencoder, "
                  r"difftools\.models\.classifier:Classifier, difftools\.models\.dit:DiT, "
                  r"difftools\.models\.lora:LoRADiT, difftools\.models\.precond:EDMPrecond, "
                  r"difftools\.models\.token_transformer:TokenTransformer")
    with pytest.raises(CheckpointError, match=r"refusing model_class .*registered: " + registered):
        difftools.load(ckpt)


def test_a_checkpoint_needs_a_registered_class_at_save_time(tmp_path):
    class Unregistered(torch.nn.Module):
        def __init__(self, width: int = 3):
            super().__init__()
            self.lin = torch.nn.Linear(width, width)

        def config(self):
            return {"width": self.lin.in_features}

    with pytest.raises(TypeError, match=r"Unregistered is not registered .*register_rebuildable"):
        ckpt_io.save_checkpoint(tmp_path / "x", Unregistered(), kind="classifier")
    assert not (tmp_path / "x").exists()
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        ckpt_io.register_rebuildable(dict)
    with pytest.raises(TypeError, match="has no config"):
        ckpt_io.register_rebuildable(type("NoConfig", (torch.nn.Module,), {}))
    with pytest.raises(ValueError, match="needs process and prediction"):
        ckpt_io.save_checkpoint(tmp_path / "y", tiny_dit())


class _Rebuildable(torch.nn.Module):
    """A model of the user's own, registered below (the registry is open to other packages)."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.lin = torch.nn.Linear(width, 2)

    def config(self):
        return {"width": self.lin.in_features}


def test_a_registered_class_of_ones_own_round_trips(tmp_path, monkeypatch):
    from difftools.models import registry

    monkeypatch.setitem(registry._REBUILDABLE, registry.class_path(_Rebuildable), _Rebuildable)
    model = _Rebuildable(5)
    ckpt_io.save_checkpoint(tmp_path / "c", model, kind="classifier", update_latest=False)
    loaded = difftools.load(tmp_path / "c")
    assert type(loaded.model) is _Rebuildable and loaded.process is None
    assert torch.equal(loaded.model.lin.weight, model.lin.weight)


# ------------------------------------------------------------------ corruption is caught
def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _overwrite_tensor_bytes(path: Path, byte: int) -> None:
    """Keep the safetensors header intact, overwrite every tensor byte."""
    data = path.read_bytes()
    body = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:body] + bytes([byte]) * (len(data) - body))


def test_config_records_the_sha256_of_every_weight_file(trained):
    import yaml

    node = yaml.safe_load((trained / "config.yaml").read_text())["checkpoint"]
    assert list(node)[0] == "weights_sha256"  # first: a truncated copy loses required keys after it
    files = sorted(p.relative_to(trained).as_posix() for p in trained.rglob("*.safetensors"))
    assert files == ["ema.safetensors", "model.safetensors"]  # this loss has no parameters
    assert node["weights_sha256"] == {f: _sha(trained / f) for f in files}


def test_overwritten_tensor_bytes_are_caught_unless_verify_is_off(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "step_0000002")
    recorded = _sha(ckpt / "ema.safetensors")
    _overwrite_tensor_bytes(ckpt / "ema.safetensors", 0)
    actual = _sha(ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match=rf"corrupt weights file {ckpt}/ema\.safetensors: its sha256 is "
                                              rf"{actual}, but {ckpt}/config\.yaml records {recorded}"):
        difftools.load(ckpt)
    loaded = difftools.load(ckpt, verify=False)  # hand-edited weights: the opt-out
    assert all(p.abs().sum() == 0 for p in loaded.model.parameters())
    assert difftools.load(ckpt, use_ema=False).step == 2  # the untouched raw weights still verify


def test_non_finite_weights_are_refused_naming_file_and_tensor(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "a")
    _overwrite_tensor_bytes(ckpt / "ema.safetensors", 0xFF)  # 0xFFFFFFFF is a float32 NaN
    with pytest.raises(CheckpointError, match=r"a/ema\.safetensors: tensor '.+' has \d+ non-finite"):
        difftools.load(ckpt, verify=False)
    model = tiny_dit()
    with torch.no_grad():
        model.x_embedder.proj.bias[1] = float("inf")
    ckpt_io.save_checkpoint(tmp_path / "b", model, process=Flow(), prediction="flow")  # hashes match
    with pytest.raises(CheckpointError, match=r"b/ema\.safetensors: tensor 'x_embedder\.proj\.bias' has 1 "
                                              r"non-finite value\(s\) of 32"):
        difftools.load(tmp_path / "b")


def test_checkpoint_without_recorded_hashes_loads_with_a_log_line(trained, tmp_path, caplog):
    import yaml

    ckpt = _copy(trained, tmp_path / "old")
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    del cfg["checkpoint"]["weights_sha256"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with caplog.at_level("INFO", logger="difftools.checkpoint"):
        assert difftools.load(ckpt).step == 2
    assert f"{ckpt}/ema.safetensors: no sha256 recorded" in caplog.text


def test_shared_base_model_without_hashes_still_loads(caplog):
    from conftest import REPO_ROOT

    base = REPO_ROOT.parent / "shared" / "models" / "cifar10_dit_t2_flow"
    if not (base / "config.yaml").is_file():
        pytest.skip(f"shared base model not found at {base}")
    with caplog.at_level("INFO", logger="difftools.checkpoint"):
        loaded = difftools.load(base)
    assert isinstance(loaded.model, DiT) and loaded.step == 12000 and loaded.prediction == "flow"
    assert "integrity not verified" in caplog.text


def test_config_truncated_at_any_line_boundary_names_the_file(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "t")
    lines = (trained / "config.yaml").read_text().splitlines(keepends=True)
    assert len(lines) > 40
    for i in range(len(lines)):
        (ckpt / "config.yaml").write_text("".join(lines[:i]))
        with pytest.raises(CheckpointError, match=rf"{ckpt}/config\.yaml"):
            difftools.load(ckpt)
    (ckpt / "config.yaml").write_text("".join(lines))
    assert difftools.load(ckpt).process is not None


def test_checkpoint_node_is_validated_by_kind(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "k")
    for change, message in [
        (dict(process=None), r"checkpoint\.process should be a process config mapping \(a 'dit' checkpoint"),
        (dict(prediction="noise"), r"checkpoint\.prediction should be one of"),
        (dict(model="depth: 2"), r"checkpoint\.model should be a mapping"),
        (dict(weights_sha256=["x"]), r"checkpoint\.weights_sha256 should be a mapping"),
        (dict(process={"kind": "Nope"}), r"checkpoint\.process \{'kind': 'Nope'\}: unknown process kind"),
        (dict(model={"depth": 2, "colour": "red"}),
         r"cannot build difftools\.models\.dit:DiT from checkpoint\.model"),
    ]:
        shutil.rmtree(ckpt)
        _copy(trained, ckpt)
        _edit_node(ckpt, **change)
        with pytest.raises(CheckpointError, match=rf"{ckpt}/config\.yaml.*{message}"):
            difftools.load(ckpt)
    shutil.rmtree(ckpt)
    _copy(trained, ckpt)
    _edit_node(ckpt, weights_sha256={"model.safetensors": _sha(ckpt / "model.safetensors")})
    with pytest.raises(CheckpointError, match=r"records the sha256 of \['model\.safetensors'\] but not of "
                                              r"ema\.safetensors"):
        difftools.load(ckpt)


def test_non_utf8_bytes_name_the_file(trained, tmp_path):
    ckpt = _copy(trained, tmp_path / "u")
    (ckpt / "config.yaml").write_bytes(b"\xff\xfe" + (trained / "config.yaml").read_bytes())
    with pytest.raises(CheckpointError, match=rf"corrupt {ckpt}/config\.yaml: not UTF-8 text \(byte 0"):
        difftools.load(ckpt)
    (tmp_path / "latest").write_bytes(b"step_\xff\n")
    with pytest.raises(CheckpointError, match=rf"corrupt pointer {tmp_path}/latest: not UTF-8"):
        difftools.load(tmp_path)


def test_resume_refuses_corrupt_weights_and_loss_state(tmp_path):
    from difftools.losses import build_loss

    def trainer(out, **kw):
        model = tiny_dit()
        loss = build_loss({"prediction": "flow", "align": {"weight": 1.0, "depth": 1}}, model, Flow())
        return make_trainer(out, model=model, loss=loss, **{"max_steps": 2, "ckpt_every": 2, **kw})

    trainer(tmp_path / "run").train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    node = ckpt_io.load_config(ckpt)["checkpoint"]
    state_file = "state/objective.safetensors"
    assert node["weights_sha256"][state_file] == _sha(ckpt / state_file)
    for name in ("state/objective.safetensors", "model.safetensors", "ema.safetensors"):
        bad = _copy(ckpt, tmp_path / name.replace("/", "_") / "step_0000002")
        _overwrite_tensor_bytes(bad / name, 0)
        with pytest.raises(CheckpointError, match=rf"step_0000002/{re.escape(name)}: its sha256 is"):
            trainer(tmp_path / "resumed", resume=str(bad)).train()
    assert trainer(tmp_path / "ok", resume=str(ckpt), max_steps=3).train().step == 3  # intact: resumes


# ------------------------------------------------------------------ commit order and crash recovery
def _record_fs_events(monkeypatch) -> list[tuple]:
    """Log os.fsync (by resolved file path), os.replace and shutil.rmtree calls, in order."""
    events: list[tuple] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", str(Path(os.readlink(f"/proc/self/fd/{fd}")).resolve())))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
        return real_replace(src, dst)

    def rmtree(path, *a, **k):
        events.append(("rmtree", str(Path(path).resolve())))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return events


def _save_with_trainer(root: Path) -> Path:
    tr = make_trainer(root.parent, max_steps=1, ckpt_every=1)
    tr._setup()
    tr.step = 3
    return tr.save()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to map fds to paths")
@pytest.mark.parametrize("writer", ["save_checkpoint", "trainer"])
def test_files_are_fsynced_before_the_rename_and_latest_moves_last(tmp_path, monkeypatch, writer):
    root = (tmp_path / "checkpoints").resolve()
    if writer == "save_checkpoint":
        _save_tiny(root / "step_0000003")  # an older version: the replace path (two renames) runs too
        events = _record_fs_events(monkeypatch)
        path = _save_tiny(root / "step_0000003", seed=1)
    else:
        _save_with_trainer(root)
        events = _record_fs_events(monkeypatch)
        path = _save_with_trainer(root)
    monkeypatch.undo()
    tmp = ckpt_io.tmp_path_for(path)
    commit = events.index(("replace", str(tmp), str(path)))
    synced = {e[1] for e in events[:commit] if e[0] == "fsync"}
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(files) >= 3 and all(str(tmp / p.relative_to(path)) in synced for p in files)
    latest = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / "latest")]
    assert len(latest) == 1 and latest[0] > commit  # `latest` names it only once it is in place
    pointer_tmp = events[latest[0]][1]
    assert ("fsync", pointer_tmp) in events[:latest[0]]
    old = ckpt_io.old_path_for(path)
    assert events[commit - 1] == ("replace", str(path), str(old))  # the old version only moved aside ...
    assert ("rmtree", str(old)) in events[commit:]  # ... and deleted after the new one is in
    assert not any(e[0] == "rmtree" and e[1] == str(path) for e in events)
    assert ckpt_io.read_latest(root) == path


@pytest.mark.parametrize("name", [".step_1.partial", ".step_1.old", ".hidden", "..", "../step_1",
                                  "sub/step_1"])
def test_latest_naming_a_hidden_or_outside_directory_is_refused(tmp_path, name):
    root = tmp_path / "run" / "checkpoints"
    _save_tiny(root / "step_1")
    for target in (root / ".step_1.partial", root / ".step_1.old", root / ".hidden",
                   tmp_path / "run" / "step_1", root / "sub" / "step_1"):
        shutil.copytree(root / "step_1", target)  # complete, loadable directories under every name
    (root / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match=rf"corrupt pointer {root}/latest: '{re.escape(name)}' is not a "
                                              "checkpoint name"):
        difftools.load(root)


def _fail_rename_onto(monkeypatch, suffix: str, src_contains: str = ""):
    real_replace = os.replace

    def flaky(src, dst):
        if str(dst).endswith(suffix) and src_contains in Path(src).name:
            raise OSError("EIO: simulated failure during rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)


def test_failed_commit_of_a_new_checkpoint_leaves_latest_on_the_previous(tmp_path, monkeypatch):
    first = _save_tiny(tmp_path / "step_1", seed=1)
    _fail_rename_onto(monkeypatch, "step_2")
    with pytest.raises(OSError, match="simulated"):
        _save_tiny(tmp_path / "step_2", seed=2)
    monkeypatch.undo()
    assert ckpt_io.read_latest(tmp_path) == first
    torch.testing.assert_close(_outputs(difftools.load(tmp_path).model), _outputs(_perturbed(tiny_dit(), 1)))


def test_crash_between_the_two_renames_is_recovered_on_read(tmp_path, monkeypatch):
    """Re-saving the checkpoint `latest` names (after resuming from an older step) and dying after
    the old version moved aside: `latest` names a missing directory until it is recovered."""
    path = _save_tiny(tmp_path / "step_2", seed=1)
    _fail_rename_onto(monkeypatch, "step_2", src_contains=".partial")  # the second rename
    with pytest.raises(OSError, match="simulated"):
        _save_tiny(tmp_path / "step_2", seed=2)
    monkeypatch.undo()
    assert not path.exists() and (tmp_path / ".step_2.old").is_dir()
    assert (tmp_path / "latest").read_text().strip() == "step_2"
    loaded = difftools.load(tmp_path)  # follows `latest`, renames .step_2.old back
    assert loaded.path == path and not (tmp_path / ".step_2.old").exists()
    torch.testing.assert_close(_outputs(loaded.model), _outputs(_perturbed(tiny_dit(), 1)))


def test_crash_between_the_two_renames_is_recovered_by_the_next_save(tmp_path, monkeypatch):
    path = _save_tiny(tmp_path / "step_2", seed=1)
    _fail_rename_onto(monkeypatch, "step_2", src_contains=".partial")
    with pytest.raises(OSError, match="simulated"):
        _save_tiny(tmp_path / "step_2", seed=2, update_latest=False)
    monkeypatch.undo()
    _save_tiny(tmp_path / "step_3", seed=3)  # a save next to it repairs step_2 first
    assert path.is_dir() and not (tmp_path / ".step_2.old").exists()
    torch.testing.assert_close(_outputs(difftools.load(path).model), _outputs(_perturbed(tiny_dit(), 1)))
    # both versions present (the crash came after the new one moved in): the stale copy goes
    shutil.copytree(path, tmp_path / ".step_3.old")
    _save_tiny(tmp_path / "step_4", seed=4)
    assert not (tmp_path / ".step_3.old").exists() and difftools.load(tmp_path / "step_3").step == 1


def test_resume_auto_recovers_and_says_which_checkpoint(tmp_path, monkeypatch, caplog):
    make_trainer(tmp_path, max_steps=4, ckpt_every=2).train()
    root = tmp_path / "checkpoints"
    first = ckpt_io.load_weights(root / "step_0000004" / "ema.safetensors")
    _fail_rename_onto(monkeypatch, "step_0000004", src_contains=".partial")
    with pytest.raises(OSError, match="simulated"):  # resumed from step 2, re-saving step 4 crashes
        make_trainer(tmp_path, max_steps=4, ckpt_every=2, resume=str(root / "step_0000002")).train()
    monkeypatch.undo()
    assert not (root / "step_0000004").exists() and (root / ".step_0000004.old").is_dir()
    with caplog.at_level("INFO"):
        result = make_trainer(tmp_path, max_steps=6, ckpt_every=2, resume="auto").train()
    assert f"recovered {root / 'step_0000004'} from .step_0000004.old" in caplog.text
    assert f"trainer.resume=auto: resuming from {root / 'step_0000004'}" in caplog.text
    assert result.step == 6 and len(result.losses) == 2
    again = ckpt_io.load_weights(root / "step_0000004" / "ema.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    caplog.clear()
    with caplog.at_level("INFO"):
        make_trainer(tmp_path / "fresh", max_steps=1, ckpt_every=1, resume="auto").train()
    assert f"trainer.resume=auto: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}" in caplog.text
