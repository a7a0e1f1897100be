"""Checkpoints as directories, written atomically, loaded without unpickling code.

Layout of one checkpoint (``<run>/checkpoints/step_000500/``)::

    model.safetensors   raw weights of the exported model (no loss-module parameters)
    ema.safetensors     EMA weights of the same model (what sampling uses)
    config.yaml         the resolved run config; its ``checkpoint`` node rebuilds everything:
                        kind, model_class, model (constructor kwargs), process, prediction,
                        autoencoder, dataset_info, step
    state/              training state: optimizer.pt, scheduler.pt, trainer.json (step, data
                        position, EMA count), loss.safetensors (loss-module parameters),
                        rng_<rank>.pt (torch / CUDA / numpy / python / noise generators)

``<run>/checkpoints/latest`` is a one-line text file naming the newest complete checkpoint.

Why directories are written under a temporary name and renamed: a crash (or a full disk, or a
kill) in the middle of a write must leave the previous checkpoint and the ``latest`` pointer
untouched. ``os.replace`` of a directory onto a fresh name and of the pointer file are atomic on
POSIX file systems, so a reader sees either the old or the new state, never a half-written one.

Every ``torch.load`` here uses ``weights_only=True`` and ``map_location="cpu"`` (resume on any
device, never execute pickled code). The model class is rebuilt from a dotted name restricted to
the ``difftools`` / ``samplers`` packages.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
STATE_DIR = "state"
LATEST_FILE = "latest"
TMP_SUFFIX = ".partial"
_ALLOWED_MODULE_PREFIXES = ("difftools.", "samplers.")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and the fix."""


# ------------------------------------------------------------------------------------ writing
def tmp_path_for(path: str | os.PathLike) -> Path:
    """The temporary sibling a checkpoint directory is written to before the rename."""
    path = Path(path)
    return path.parent / f".{path.name}{TMP_SUFFIX}"


def begin_directory(path: str | os.PathLike) -> Path:
    """Create (empty) the temporary directory for ``path``; a stale one from a crash is removed."""
    tmp = tmp_path_for(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_directory(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Atomically move the finished ``tmp`` directory to ``path`` (replacing an older ``path``)."""
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    if path.exists():
        # os.replace cannot overwrite a non-empty directory: move the old one aside first. Between
        # the two renames ``path`` is briefly absent, but ``latest`` never points at it then.
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Write a directory atomically::

        with atomic_directory("ckpt/step_000100") as tmp:
            (tmp / "model.safetensors").write_bytes(...)

    Files go to a temporary sibling; on normal exit it is renamed to ``path``; on an exception it
    is deleted and ``path`` (if it existed) is left exactly as it was.
    """
    tmp = begin_directory(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, path)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write one file atomically: yield a temporary sibling to write to; on normal exit it is
    fsynced and renamed over ``path``; on an exception it is deleted and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush file contents before the rename makes them visible (else a power cut could expose
    a renamed directory with empty files)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def write_latest(root: str | os.PathLike, name: str) -> None:
    """Point ``root/latest`` at checkpoint ``name`` (atomic: write a temp file, then rename)."""
    with atomic_file(Path(root) / LATEST_FILE) as tmp:
        tmp.write_text(name + "\n")


def save_weights(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Save tensors as safetensors (CPU, contiguous, unshared copies)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(path))


def save_config(path: str | os.PathLike, config: Mapping) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(_plain(config), f, sort_keys=False)


def _plain(obj: Any) -> Any:
    """Mappings / sequences / tensors -> plain YAML-safe Python values."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "_asdict"):
        return _plain(obj._asdict())
    if hasattr(obj, "__dataclass_fields__"):
        return _plain({k: getattr(obj, k) for k in obj.__dataclass_fields__})
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def checkpoint_meta(model: torch.nn.Module, *, kind: str = "dit", process=None, prediction: str | None = None,
                    autoencoder=None, dataset_info=None, step: int | None = None) -> dict:
    """The ``checkpoint`` node of config.yaml: everything :func:`load` needs to rebuild the model."""
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no config() method; a checkpoint needs the "
                        "constructor arguments to rebuild the model")
    return _plain({
        "kind": kind,
        "model_class": class_path(model),
        "model": model.config(),
        "process": None if process is None else process.config(),
        "prediction": prediction,
        "autoencoder": None if autoencoder is None else autoencoder.config(),
        "dataset_info": dataset_info,
        "step": step,
    })


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, config: Mapping | None = None,
                    ema_state: Mapping[str, torch.Tensor] | None = None, kind: str = "dit", process=None,
                    prediction: str | None = None, autoencoder=None, dataset_info=None,
                    step: int | None = None, update_latest: bool = True) -> Path:
    """Write a complete (weights + config) checkpoint directory atomically; single process.

    The trainer writes the same layout plus ``state/`` (see :class:`difftools.training.Trainer`).
    ``config`` is the run config (any nested mapping); the ``checkpoint`` node is added to it.
    With ``update_latest`` the parent folder's ``latest`` pointer names this checkpoint.
    """
    path = Path(path)
    full = dict(_plain(config or {}))
    full["checkpoint"] = checkpoint_meta(model, kind=kind, process=process, prediction=prediction,
                                         autoencoder=autoencoder, dataset_info=dataset_info, step=step)
    with atomic_directory(path) as tmp:
        save_weights(tmp / MODEL_FILE, model.state_dict())
        save_weights(tmp / EMA_FILE, ema_state if ema_state is not None else model.state_dict())
        save_config(tmp / CONFIG_FILE, full)
    if update_latest:
        write_latest(path.parent, path.name)
    return path


def prune_checkpoints(root: str | os.PathLike, keep_last: int, prefix: str = "step_",
                      keep: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``step_*`` checkpoints (never the one ``latest`` names,
    nor those in ``keep``, e.g. the newest vetted one)."""
    root = Path(root)
    if keep_last <= 0:
        return []
    ckpts = sorted((p for p in root.glob(f"{prefix}*") if p.is_dir()), key=lambda p: p.name)
    latest = read_latest(root)
    protected = {Path(p).resolve() for p in keep} | ({latest.resolve()} if latest is not None else set())
    removed = []
    for p in ckpts[:-keep_last]:
        if p.resolve() in protected:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------ reading
def read_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint directory ``root/latest`` points at, or None when there is no pointer."""
    pointer = Path(root) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"corrupt pointer {pointer}: {name!r} is not a checkpoint name")
    return Path(root) / name


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory, a ``checkpoints/`` folder with ``latest`` (or that pointer file), or a
    run directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    if (path / CONFIG_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    if path.is_file() and path.name == LATEST_FILE:  # `checkpoints/latest`, the pointer file itself
        path = path.parent
    for root in (path, path / "checkpoints"):
        target = read_latest(root)
        if target is not None:
            if not target.is_dir():
                raise CheckpointError(f"{root / LATEST_FILE} names {target.name}, but {target} does not "
                                      "exist (deleted or never finished)")
            return target
    raise CheckpointError(f"{path} is not a checkpoint: expected {MODEL_FILE} and {CONFIG_FILE} in it, "
                          f"or a '{LATEST_FILE}' pointer in it or in {path / 'checkpoints'}")


def require_file(ckpt: Path, name: str) -> Path:
    f = Path(ckpt) / name
    if not f.is_file():
        raise CheckpointError(f"incomplete checkpoint {ckpt}: missing {name} (the write was interrupted "
                              f"or the file was deleted); use an earlier checkpoint or the "
                              f"'{LATEST_FILE}' one")
    return f


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or garbled file raises :class:`CheckpointError`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises SafetensorError / OSError / ValueError
        raise CheckpointError(f"corrupt weights file {path}: {err}") from err


def load_config(ckpt: str | os.PathLike) -> dict:
    f = require_file(Path(ckpt), CONFIG_FILE)
    try:
        cfg = yaml.safe_load(f.read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"corrupt {f}: not valid YAML ({err})") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"corrupt {f}: expected a mapping at top level, got {type(cfg).__name__}")
    return cfg


def torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` and ``map_location='cpu'`` and a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"incomplete checkpoint: missing {path}") from err
    except Exception as err:
        raise CheckpointError(f"corrupt state file {path}: {err}") from err


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"incomplete checkpoint: missing {path}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupt {path}: {err}") from err


def import_class(path: str):
    """``"difftools.models.dit:DiT"`` -> the class; only difftools / samplers modules are allowed."""
    module, _, qualname = str(path).partition(":")
    if not module.startswith(_ALLOWED_MODULE_PREFIXES) or not qualname:
        raise CheckpointError(f"refusing model_class {path!r}: only classes from the difftools or samplers "
                              "packages can be rebuilt from a checkpoint")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Loaded:
    """What :func:`load` returns. ``process``/``prediction``/``autoencoder`` are None for models
    that are not denoisers (e.g. classifiers)."""

    model: torch.nn.Module
    process: Any
    prediction: str | None
    autoencoder: Any
    config: dict
    dataset_info: dict | None
    path: Path
    step: int | None


def load(ckpt_dir: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild model (+ process, prediction, autoencoder) from a checkpoint directory.

    ``ckpt_dir`` may be the checkpoint itself, its ``checkpoints/`` folder or the run directory
    (the ``latest`` pointer is followed). ``use_ema`` picks ``ema.safetensors`` (what sampling
    should use) over the raw ``model.safetensors``. The model comes back in eval mode.
    """
    ckpt = resolve_checkpoint(ckpt_dir)
    config = load_config(ckpt)
    meta = config.get("checkpoint")
    if not isinstance(meta, dict) or "model" not in meta or "model_class" not in meta:
        raise CheckpointError(f"{ckpt / CONFIG_FILE} has no 'checkpoint' node with model_class and model: "
                              "not written by difftools.checkpoint")
    weights_file = require_file(ckpt, EMA_FILE if use_ema else MODEL_FILE)
    state = load_weights(weights_file)
    cls = import_class(meta["model_class"])
    model = cls(**meta["model"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights_file} does not match {meta['model_class']}: missing keys "
                              f"{missing[:5]}, unexpected keys {unexpected[:5]}")
    model.to(device).eval()

    process = None
    if meta.get("process") is not None:
        from difftools.process import process_from_config

        process = process_from_config(meta["process"])
    autoencoder = None
    if meta.get("autoencoder") is not None:
        from difftools.models.vae import autoencoder_from_config

        autoencoder = autoencoder_from_config(meta["autoencoder"]).to(device)
    return Loaded(model=model, process=process, prediction=meta.get("prediction"), autoencoder=autoencoder,
                  config=config, dataset_info=meta.get("dataset_info"), path=ckpt, step=meta.get("step"))
