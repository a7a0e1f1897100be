"""What every converter shares: reading a foreign weights file without running its code, checking a
state dict against the layout it must have, and writing the result as a difftools checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from difftools.checkpoint import (
    CONFIG_FILE,
    INDEX_SUFFIX,
    check_finite,
    file_sha256,
    load_weights,
    save_checkpoint,
    weights_sha256,
)

log = logging.getLogger("difftools.interop")

#: where training scripts keep the weights inside a saved dict, most wanted first (facebookresearch/DiT's and
#: SiT's train.py save {"model", "ema", "opt", "args"}; their sample.py prefers "ema")
STATE_KEYS = ("ema", "model", "state_dict", "module")


class ConversionError(ValueError):
    """A foreign checkpoint does not fit the converter; the message names the file, keys or option."""


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: ``*.safetensors`` (or a sharded ``*.safetensors.index.json``), or a
    PyTorch pickle (``.pt``/``.pth``/``.bin``) read with ``weights_only=True``.

    A pickle may hold the state dict itself or a training checkpoint dict; then ``key`` picks the entry
    (default: the first of ``STATE_KEYS`` present, i.e. the EMA weights). Only tensors, containers and
    ``argparse.Namespace`` (the ``args`` that DiT's and SiT's train.py store) are unpickled, never code.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"weights file not found: {path}")
    if path.name.endswith(".safetensors") or path.name.endswith(".safetensors" + INDEX_SUFFIX):
        state = load_weights(path.with_name(path.name.removesuffix(INDEX_SUFFIX)))
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConversionError(
                f"cannot read {path} as PyTorch weights without running code from it ({err}). Convert it to "
                "safetensors in the environment that wrote it, or pass a .safetensors file"
            ) from err
        state = _state_of(obj, key, path)
    check_finite(state, path)
    return state


def _state_of(obj, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if key is not None:
            raise ConversionError(
                f"{path} is a plain state dict; it has no entry {key!r} to pick (drop --weights-key)"
            )
        return dict(obj)
    present = [k for k in obj if isinstance(obj[k], Mapping)]
    chosen = key if key is not None else next((k for k in STATE_KEYS if k in present), None)
    if chosen is None or chosen not in present:
        raise ConversionError(
            f"{path}: no state dict under {chosen!r}; its entries are {sorted(map(str, obj))} "
            f"(dicts among them: {present}); pick one with --weights-key"
        )
    state = obj[chosen]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}[{chosen!r}] is not a state dict: {bad[:5]} are not tensors")
    return dict(state)


def check_layout(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str, hint: str = ""
) -> None:
    """Refuse ``state`` unless it has exactly the keys of ``expected`` with those shapes; the error lists
    every missing and unexpected key and every shape mismatch (``source`` names the file and format)."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k])} expected"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
            parts.append(f"{what} ({len(items)}): " + "; ".join(items[:10]) + more)
    raise ConversionError(
        f"{source} does not match the expected layout: " + ". ".join(parts) + (f". {hint}" if hint else "")
    )


def provenance(source: str, weights: str | os.PathLike, **details) -> dict:
    """The ``interop`` node of the converted checkpoint's config.yaml: where the weights came from."""
    weights = Path(weights)
    digest = (
        weights_sha256(weights.parent, weights.name.removesuffix(INDEX_SUFFIX))
        if weights.name.endswith(INDEX_SUFFIX)
        else file_sha256(weights)
    )
    return {"source": source, "weights": str(weights), "weights_sha256": digest, **details}


def prepare_out(
    out: str | os.PathLike, overwrite: bool, marker: str = CONFIG_FILE, what: str = "difftools checkpoint"
) -> Path:
    """``out`` if it is free: absent, an empty folder, or (with ``overwrite``) an earlier output of the same
    kind (a ``what``, recognised by its file ``marker``).

    Anything else is refused: writing replaces the whole directory, so pointing ``--out`` at a folder
    that holds other files must not delete them.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; give a directory to write to")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise ConversionError(
                f"--out {out} is a non-empty directory that is not a {what} (no {marker}); "
                "refusing to replace it. Give a new directory"
            )
        if not overwrite:
            raise ConversionError(
                f"--out {out} already holds a {what}; pass --overwrite (overwrite=True) to replace it"
            )
    return out


def write_checkpoint(
    out: str | os.PathLike,
    model: torch.nn.Module,
    *,
    process,
    prediction: str,
    interop: dict,
    autoencoder=None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write ``model`` as a difftools checkpoint directory that :func:`difftools.load` reads (raw and EMA
    weights are the same tensors), with ``interop`` as the config's provenance node."""
    out = prepare_out(out, overwrite)
    path = save_checkpoint(
        out,
        model,
        config={"interop": interop},
        kind="dit",
        process=process,
        prediction=prediction,
        autoencoder=autoencoder,
        update_latest=False,
        max_shard_size=max_shard_size,
    )
    log.info("wrote %s (%s, prediction %s)", path, type(process).__name__, prediction)
    return path
