"""Checkpoints as directories, written atomically, loaded without unpickling code.

Layout of one checkpoint (``<run>/checkpoints/step_000500/``)::

    model.safetensors   raw weights of the exported model (no loss-module parameters)
    ema.safetensors     EMA weights of the same model (what sampling uses)
                        (either one, above ``max_shard_size``, as shards: ``ema.safetensors.index.json``
                        + ``ema-00001-of-0000N.safetensors``..., see :func:`save_weights`)
    config.yaml         the resolved run config; its ``checkpoint`` node rebuilds everything:
                        weights_sha256 (of every *.safetensors file), kind, model_class, model
                        (constructor kwargs), process, prediction, autoencoder, dataset_info, step
    state/              training state: optimizer.pt, scheduler.pt, trainer.json (step, data
                        position, EMA count), loss.safetensors (loss-module parameters),
                        rng_<rank>.pt (torch / CUDA / numpy / python / noise generators)

``<run>/checkpoints/latest`` is a one-line text file naming the newest complete checkpoint.

Why directories are written under a temporary name and renamed: a crash (or a full disk, or a
kill) in the middle of a write must leave the previous checkpoint and the ``latest`` pointer
untouched. ``os.replace`` of a directory onto a fresh name and of the pointer file are atomic on
POSIX file systems, so a reader sees either the old or the new state, never a half-written one.

Replacing an existing directory takes two renames (old one aside to ``.<name>.old``, new one in).
A crash between them leaves the complete previous version in ``.<name>.old``; the next read of
``latest`` or the next write into the same folder renames it back (:func:`recover_directory`), so
a ``latest`` that names it works again without manual repair.

Nothing in a checkpoint runs code:

* Every ``torch.load`` here uses ``weights_only=True`` and ``map_location="cpu"`` (resume on any
  device, never execute pickled code).
* ``model_class`` (and a wrapper's nested ``net_class``) is looked up by its exact name in a
  registry of rebuildable ``nn.Module`` classes (:func:`register_rebuildable`; the built-in ones
  are DiT, EDMPrecond and Classifier). Nothing is imported or reached by attribute from the name,
  so a config.yaml cannot make :func:`load` call an arbitrary function with its keywords.

Corruption is caught on load: config.yaml records the sha256 of every ``*.safetensors`` file it
was written with (``checkpoint.weights_sha256``, first in the node so that a file truncated at a
line boundary loses required keys after it), :func:`read_checkpoint_weights` checks it (opt out
with ``verify=False`` for hand-edited weights) and refuses NaN/inf tensors, and the
``checkpoint`` node is validated (:func:`checkpoint_node`). Every error is a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from difftools.files import atomic_file, file_sha256  # noqa: F401 (re-exported: used across packages)
from difftools.loaded import Loaded
from difftools.models.registry import (  # noqa: F401 (register_rebuildable re-exported)
    UnregisteredClassError,
    class_path,
    rebuildable_class,
    rebuildable_classes,
    rebuildable_name,
    register_rebuildable,
)
from difftools.models.vae import autoencoder_from_config
from difftools.process import PREDICTIONS, process_from_config

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
STATE_DIR = "state"
LATEST_FILE = "latest"
TMP_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
HASHES_KEY = "weights_sha256"
#: sharded ``<name>.safetensors`` = ``<name>.safetensors.index.json`` + shards (transformers / diffusers)
INDEX_SUFFIX = ".index.json"
#: weights larger than this are written as shards (diffusers' default); ``$DIFFTOOLS_MAX_SHARD_SIZE``
#: or the ``max_shard_size`` argument override it
DEFAULT_MAX_SHARD_SIZE = "10GB"
SHARD_SIZE_ENV = "DIFFTOOLS_MAX_SHARD_SIZE"
#: keys checkpoint_meta writes; all must be present on load (a missing one means a truncated file)
NODE_KEYS = ("kind", "model_class", "model", "process", "prediction", "autoencoder", "dataset_info", "step")
#: checkpoint kinds that are not denoisers (no process / prediction); every other kind is one
#: (masked_lm / char_lm: the token models of difftools.discrete; caso_embeddings: difftools.editing)
NON_DENOISER_KINDS = ("classifier", "autoencoder", "masked_lm", "char_lm", "caso_embeddings")

log = logging.getLogger("difftools.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and the fix."""


# ------------------------------------------------------------------------------------ writing
def tmp_path_for(path: str | os.PathLike) -> Path:
    """The temporary sibling a checkpoint directory is written to before the rename."""
    path = Path(path)
    return path.parent / f".{path.name}{TMP_SUFFIX}"


def old_path_for(path: str | os.PathLike) -> Path:
    """Where :func:`commit_directory` moves an existing ``path`` while the new one is renamed in."""
    path = Path(path)
    return path.parent / f".{path.name}{OLD_SUFFIX}"


def recover_directory(path: str | os.PathLike) -> bool:
    """Repair a replace of ``path`` that was interrupted between the two renames of
    :func:`commit_directory`: if ``path`` is missing and ``.<name>.old`` holds the previous version,
    rename it back (True); if both exist, the new version made it in and the stale copy is removed.

    Safe to call from several processes at once (the loser of the rename finds ``path`` in place).
    """
    path = Path(path)
    old = old_path_for(path)
    if not old.is_dir():
        return False
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    try:
        os.replace(old, path)
    except OSError:
        if not path.is_dir():
            raise
        return False
    _fsync_dir(path.parent)
    log.warning("recovered %s from %s: a write replacing it was interrupted between its two renames",
                path, old.name)
    return True


def recover_interrupted_commits(root: str | os.PathLike) -> list[Path]:
    """:func:`recover_directory` for every ``.<name>.old`` left in ``root``; the restored paths."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name[1:-len(OLD_SUFFIX)] for p in root.glob(f".*{OLD_SUFFIX}") if p.is_dir()]
    return [root / n for n in sorted(names) if n and not n.startswith(".") and recover_directory(root / n)]


def begin_directory(path: str | os.PathLike) -> Path:
    """Create (empty) the temporary directory for ``path``; a stale one from a crash is removed, and
    a replace next to it that crashed half-way is repaired first (:func:`recover_interrupted_commits`)."""
    path = Path(path)
    recover_interrupted_commits(path.parent)
    tmp = tmp_path_for(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_directory(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Atomically move the finished ``tmp`` directory to ``path`` (replacing an older ``path``).

    Every file is fsynced before the rename makes it visible. Replacing takes two renames (the old
    directory aside, the new one in) and the old copy is deleted only after the new one is in place,
    so a crash at any point leaves a complete version: in ``path``, or in ``.<name>.old`` from where
    :func:`recover_directory` restores it.
    """
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    if path.exists():
        # os.replace cannot overwrite a non-empty directory: move the old one aside first
        old = old_path_for(path)
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


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"10GB"``, ``"500MB"`` (powers of 1000, as in
    transformers / diffusers) or ``"2GiB"`` (powers of 1024)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
                 "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1, "": 1}
        unit = next(u for u in units if text.endswith(u))  # longest units first, "" matches last
        try:
            value = int(float(text[: len(text) - len(unit)]) * units[unit])
        except (ValueError, OverflowError):  # "ten GB", "infGB"
            value = 0
    if value <= 0:
        raise ValueError(f"max_shard_size must be a positive size such as 10GB, 500MB or 2GiB, got {size!r}")
    return value


def max_shard_bytes(max_shard_size: int | str | None = None) -> int:
    """The shard size limit: the argument, else ``$DIFFTOOLS_MAX_SHARD_SIZE``, else 10GB."""
    if max_shard_size is None:
        max_shard_size = os.environ.get(SHARD_SIZE_ENV) or DEFAULT_MAX_SHARD_SIZE
    return parse_size(max_shard_size)


def shard_name(path: str | os.PathLike, index: int, count: int) -> str:
    """``model.safetensors`` -> ``model-00002-of-00005.safetensors`` (1-based ``index``)."""
    stem = Path(path).name.removesuffix(".safetensors")
    return f"{stem}-{index:05d}-of-{count:05d}.safetensors"


def index_path_for(path: str | os.PathLike) -> Path:
    """``.../model.safetensors`` -> ``.../model.safetensors.index.json``."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def _remove_weights(path: Path) -> None:
    """Delete ``path`` in either form (one file, or index + shards), so a rewrite leaves no stale twin."""
    path.unlink(missing_ok=True)
    index_path_for(path).unlink(missing_ok=True)
    stem = path.name.removesuffix(".safetensors")
    for shard in path.parent.glob(f"{stem}-?????-of-?????.safetensors"):
        shard.unlink()


def save_weights(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                 max_shard_size: int | str | None = None) -> list[Path]:
    """Save tensors as safetensors (CPU, contiguous, unshared copies); the files written.

    Up to ``max_shard_size`` bytes (:func:`max_shard_bytes`) in total this is the one file ``path``.
    Above it, the transformers / diffusers sharded layout: shards ``<stem>-0000i-of-0000N.safetensors``
    of at most that size each (a single larger tensor gets a shard of its own), filled in key order,
    and ``<path>.index.json`` = ``{"metadata": {"total_size": bytes}, "weight_map": {key: shard}}``.
    :func:`load_weights` reads both forms; every shard gets its own sha256 in config.yaml.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    limit = max_shard_bytes(max_shard_size)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    _remove_weights(path)
    if total <= limit:
        save_file(tensors, str(path))
        return [path]
    groups: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map, written = {}, []
    for i, keys in enumerate(groups, start=1):
        name = shard_name(path, i, len(groups))
        save_file({k: tensors[k] for k in keys}, str(path.parent / name))
        weight_map.update(dict.fromkeys(keys, name))
        written.append(path.parent / name)
    index = index_path_for(path)
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [index, *written]


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


def record_weight_hashes(config: Mapping, folder: str | os.PathLike) -> dict:
    """``config`` with the sha256 of every ``*.safetensors`` file (each shard of a sharded one, and its
    ``.index.json``) under ``folder`` (keyed by its path relative to ``folder``) as
    ``checkpoint.weights_sha256``, the first key of that node.

    First, because the node is the last thing in config.yaml: a copy truncated at a line boundary
    then loses required keys after the hashes (caught by :func:`checkpoint_node`) instead of
    silently losing the hashes. Call it after the last weight file is written.
    """
    folder = Path(folder)
    config = dict(config)
    if not isinstance(config.get("checkpoint"), Mapping):
        raise ValueError("record_weight_hashes needs the config's 'checkpoint' node (checkpoint_meta)")
    files = sorted([*folder.rglob("*.safetensors"), *folder.rglob(f"*.safetensors{INDEX_SUFFIX}")])
    hashes = {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}
    node = {k: v for k, v in config["checkpoint"].items() if k != HASHES_KEY}
    config["checkpoint"] = {HASHES_KEY: hashes, **node}
    return config


def checkpoint_meta(model: torch.nn.Module, *, kind: str = "dit", process=None, prediction: str | None = None,
                    autoencoder=None, dataset_info=None, step: int | None = None) -> dict:
    """The ``checkpoint`` node of config.yaml: everything :func:`load` needs to rebuild the model.

    A denoiser (any kind but those in ``NON_DENOISER_KINDS``) needs ``process`` and ``prediction``.
    """
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no config() method; a checkpoint needs the "
                        "constructor arguments to rebuild the model")
    model_class = rebuildable_name(model)
    if kind not in NON_DENOISER_KINDS and (process is None or prediction is None):
        raise ValueError(f"a {kind!r} checkpoint is a denoiser and needs process and prediction (got "
                         f"process={process!r}, prediction={prediction!r}); non-denoisers use kind in "
                         f"{NON_DENOISER_KINDS}")
    return _plain({
        "kind": kind,
        "model_class": model_class,
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
                    step: int | None = None, update_latest: bool = True,
                    max_shard_size: int | str | None = None) -> Path:
    """Write a complete (weights + config) checkpoint directory atomically; single process.

    The trainer writes the same layout plus ``state/`` (see :class:`difftools.training.Trainer`).
    ``config`` is the run config (any nested mapping); the ``checkpoint`` node is added to it, with
    the sha256 of both weight files. With ``update_latest`` the parent folder's ``latest`` pointer
    names this checkpoint (after the directory is in place). Weights above ``max_shard_size``
    (:func:`max_shard_bytes`) are written as shards (:func:`save_weights`).
    """
    path = Path(path)
    full = dict(_plain(config or {}))
    full["checkpoint"] = checkpoint_meta(model, kind=kind, process=process, prediction=prediction,
                                         autoencoder=autoencoder, dataset_info=dataset_info, step=step)
    with atomic_directory(path) as tmp:
        save_weights(tmp / MODEL_FILE, model.state_dict(), max_shard_size)
        ema = ema_state if ema_state is not None else model.state_dict()
        save_weights(tmp / EMA_FILE, ema, max_shard_size)
        save_config(tmp / CONFIG_FILE, record_weight_hashes(full, tmp))
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
def _read_text(path: Path, what: str = "") -> str:
    """A text file's contents; bytes that are not UTF-8 are a :class:`CheckpointError` naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"corrupt {what}{path}: not UTF-8 text (byte {err.start}: "
                              f"{err.object[err.start:err.start + 4]!r})") from err


def read_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint directory ``root/latest`` points at, or None when there is no pointer.

    A pointer naming a directory whose replacement crashed half-way is repaired first
    (:func:`recover_directory`); the result may still not exist (deleted by hand).
    """
    pointer = Path(root) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = _read_text(pointer, "pointer ").strip()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise CheckpointError(f"corrupt pointer {pointer}: {name!r} is not a checkpoint name")
    target = Path(root) / name
    if not target.is_dir():
        recover_directory(target)
    return target


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory, a ``checkpoints/`` folder with ``latest`` (or that pointer file), or a
    run directory."""
    path = Path(path).expanduser()
    if not path.exists():
        if recover_directory(path):  # a checkpoint directory named directly, mid-replace
            return path
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
    """Read a safetensors file, or its sharded form (``<path>.index.json`` + shards, see
    :func:`save_weights`) when ``path`` itself is absent; a truncated or garbled file, a missing
    shard or an index that does not match its shards raises :class:`CheckpointError`.

    This checks the files' structure only; :func:`read_checkpoint_weights` also checks their recorded
    sha256 and that every value is finite.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file() and index_path_for(path).is_file():
        return _load_sharded(index_path_for(path), device)
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises SafetensorError / OSError / ValueError
        raise CheckpointError(f"corrupt weights file {path}: {err}") from err


def read_shard_index(index: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded-weights index, validated:
    a mapping of names to plain ``*.safetensors`` file names next to the index."""
    index = Path(index)
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"corrupt {index}: expected a non-empty 'weight_map' of tensor name -> "
                              "shard file")
    for key, shard in weight_map.items():
        # a plain name: an index must not make the reader open files outside its own folder
        if (not isinstance(shard, str) or Path(shard).name != shard or shard.startswith(".")
                or not shard.endswith(".safetensors")):
            raise CheckpointError(f"corrupt {index}: tensor {key!r} maps to {shard!r}, which is not a "
                                  "*.safetensors file name in the same folder")
    return weight_map


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The files that hold the weights ``path``: ``[path]``, or its index followed by its shards."""
    path = Path(path)
    index = index_path_for(path)
    if path.is_file() or not index.is_file():
        return [path]
    return [index, *(index.parent / name for name in sorted(set(read_shard_index(index).values())))]


def _load_sharded(index: Path, device) -> dict[str, torch.Tensor]:
    weight_map = read_shard_index(index)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        f = index.parent / shard
        if not f.is_file():
            raise CheckpointError(f"incomplete sharded weights {index}: shard {f} is missing (the copy or "
                                  "the write was interrupted); copy it again or use another checkpoint")
        part = load_weights(f, device)
        listed = {k for k, s in weight_map.items() if s == shard}
        if set(part) != listed:
            extra, absent = sorted(set(part) - listed), sorted(listed - set(part))
            what = ([f"holds {extra[:5]}, which the index does not assign to it"] if extra else []) + (
                [f"lacks {absent[:5]}, which the index assigns to it"] if absent else [])
            raise CheckpointError(f"corrupt sharded weights {index}: shard {shard} " + " and ".join(what))
        state.update(part)
    return state


def check_finite(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse NaN / inf in any floating-point tensor (naming ``source`` and the tensor)."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointError(f"corrupt weights file {source}: tensor {key!r} has {bad} non-finite "
                                      f"value(s) of {value.numel()} (NaN/inf); a model with them produces "
                                      "NaN or blank samples. Use an earlier checkpoint")


def read_checkpoint_weights(ckpt: str | os.PathLike, name: str, node: Mapping | None, *, verify: bool = True,
                            device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load ``ckpt/name`` (e.g. ``ema.safetensors``, ``state/loss.safetensors``) after checking its
    sha256 against ``node["weights_sha256"]`` (the validated ``checkpoint`` node of config.yaml), and
    refuse non-finite values. A sharded ``name`` (``name.index.json`` + shards) is read transparently,
    each of its files checked against its own recorded sha256.

    ``verify=False`` skips the hash check (weights edited on purpose); checkpoints written before
    hashes were recorded load with the check skipped and a log line.
    """
    ckpt = Path(ckpt)
    if not (ckpt / name).is_file() and not index_path_for(ckpt / name).is_file():
        require_file(ckpt, name)  # neither form: the usual "incomplete checkpoint" error
    files = shard_files(ckpt / name)
    recorded = (node or {}).get(HASHES_KEY)
    if not verify:
        log.info("%s: sha256 check skipped (verify=False)", ckpt / name)
    elif recorded is None:
        log.info("%s: no sha256 recorded in %s (written before checkpoints recorded them); integrity not "
                 "verified", ckpt / name, ckpt / CONFIG_FILE)
    else:
        for f in files:
            _verify_sha256(ckpt, f, recorded)
    state = load_weights(ckpt / name, device)
    check_finite(state, ckpt / name)
    return state


def _verify_sha256(ckpt: Path, f: Path, recorded: Mapping[str, str]) -> None:
    rel = f.relative_to(ckpt).as_posix()
    if rel not in recorded:
        raise CheckpointError(f"{ckpt / CONFIG_FILE} records the sha256 of {sorted(recorded)} but not of "
                              f"{rel}: the file was added after the checkpoint was written")
    if not f.is_file():
        raise CheckpointError(f"incomplete checkpoint {ckpt}: missing {rel} (a shard of sharded weights); "
                              "copy it again or use another checkpoint")
    actual = file_sha256(f)
    if actual != recorded[rel]:
        raise CheckpointError(
            f"corrupt weights file {f}: its sha256 is {actual}, but {ckpt / CONFIG_FILE} records "
            f"{recorded[rel]}: the file changed after it was saved (disk or copy error). Use another "
            "checkpoint; if you edited the weights on purpose, load with verify=False "
            "(scripts/sample.py: verify_weights=false)")


def weights_sha256(ckpt: str | os.PathLike, name: str = EMA_FILE) -> str:
    """One sha256 that identifies the weights ``ckpt/name``: the file's own sha256, or for sharded
    weights the sha256 of the index's and every shard's sha256 (in file order)."""
    files = shard_files(Path(ckpt) / name)
    if len(files) == 1:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def load_config(ckpt: str | os.PathLike) -> dict:
    """config.yaml of a checkpoint as a dict (any error names the file)."""
    f = require_file(Path(ckpt), CONFIG_FILE)
    try:
        cfg = yaml.safe_load(_read_text(f))
    except yaml.YAMLError as err:
        raise CheckpointError(f"corrupt {f}: not valid YAML ({err})") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"corrupt {f}: expected a mapping at top level, got {type(cfg).__name__}")
    return cfg


def checkpoint_node(config: Mapping, source: str | os.PathLike) -> dict:
    """The ``checkpoint`` node of a loaded config.yaml, validated (``source`` is the file, for errors).

    Every key :func:`checkpoint_meta` writes must be present (a missing one means a truncated or
    edited file); ``model_class`` is a string and ``model`` a mapping; a denoiser (any kind but
    ``NON_DENOISER_KINDS``) has a ``process`` mapping and a known ``prediction``.
    """
    node = config.get("checkpoint")
    if not isinstance(node, dict):
        raise CheckpointError(f"{source} has no 'checkpoint' node (found {node!r}): not written by "
                              "difftools.checkpoint, or the file was truncated")
    missing = [k for k in NODE_KEYS if k not in node]
    if missing:
        raise CheckpointError(f"corrupt {source}: checkpoint node lacks {', '.join(missing)} (the file was "
                              "truncated or edited); restore it from a copy or use another checkpoint")

    def bad(key: str, expected: str):
        return CheckpointError(f"corrupt {source}: checkpoint.{key} should be {expected}, got {node[key]!r}")

    if not isinstance(node["model_class"], str):
        raise bad("model_class", "a 'module:Class' string")
    if not isinstance(node["model"], dict):
        raise bad("model", "a mapping of constructor arguments")
    if node["kind"] not in NON_DENOISER_KINDS:
        if not isinstance(node["process"], dict):
            raise bad("process", f"a process config mapping (a {node['kind']!r} checkpoint is a denoiser)")
        if node["prediction"] not in PREDICTIONS:
            raise bad("prediction", f"one of {PREDICTIONS} (a {node['kind']!r} checkpoint is a denoiser)")
    hashes = node.get(HASHES_KEY)
    if hashes is not None and not (isinstance(hashes, dict)
                                   and all(isinstance(v, str) for v in hashes.values())):
        raise bad(HASHES_KEY, "a mapping of file name to sha256 hex string")
    return node


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
        return json.loads(_read_text(Path(path)))
    except FileNotFoundError as err:
        raise CheckpointError(f"incomplete checkpoint: missing {path}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupt {path}: {err}") from err


def load(ckpt_dir: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu",
         verify: bool = True) -> Loaded:
    """Rebuild model (+ process, prediction, autoencoder) from a checkpoint directory.

    ``ckpt_dir`` may be the checkpoint itself, its ``checkpoints/`` folder or the run directory
    (the ``latest`` pointer is followed). ``use_ema`` picks ``ema.safetensors`` (what sampling
    should use) over the raw ``model.safetensors``. ``verify=False`` skips the check of the weight
    file against the sha256 recorded in config.yaml (for hand-edited weights); NaN/inf weights are
    refused either way. The model comes back in eval mode.
    """
    ckpt = resolve_checkpoint(ckpt_dir)
    config = load_config(ckpt)
    source = ckpt / CONFIG_FILE
    meta = checkpoint_node(config, source)
    try:  # refused before anything is built or read
        cls = rebuildable_class(meta["model_class"])
    except UnregisteredClassError as err:
        raise CheckpointError(f"{source}: {err}") from err
    weights_file = EMA_FILE if use_ema else MODEL_FILE
    state = read_checkpoint_weights(ckpt, weights_file, meta, verify=verify)
    try:
        model = cls(**meta["model"])
    except UnregisteredClassError as err:  # e.g. EDMPrecond's nested net_class refused
        raise CheckpointError(f"{source}: {err}") from err
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"corrupt {source}: cannot build {meta['model_class']} from checkpoint.model: "
                              f"{err}") from err
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise CheckpointError(f"{ckpt / weights_file} does not match {meta['model_class']} as configured in "
                              f"{source}: {err}") from err
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / weights_file} does not match {meta['model_class']}: missing keys "
                              f"{missing[:5]}, unexpected keys {unexpected[:5]}")
    model.to(device).eval()

    process = None
    if meta["process"] is not None:
        try:
            process = process_from_config(meta["process"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"corrupt {source}: checkpoint.process {meta['process']!r}: {err}") from err
    autoencoder = None
    if meta["autoencoder"] is not None:
        try:
            autoencoder = autoencoder_from_config(meta["autoencoder"]).to(device)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"corrupt {source}: checkpoint.autoencoder {meta['autoencoder']!r}: "
                                  f"{err}") from err
    return Loaded(model=model, process=process, prediction=meta["prediction"], autoencoder=autoencoder,
                  config=config, dataset_info=meta["dataset_info"], path=ckpt, step=meta["step"])
