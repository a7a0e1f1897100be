"""The registry of model classes a checkpoint may rebuild (``model_class`` / a wrapper's ``net_class``).

Why a registry: a checkpoint is data. Rebuilding a model from a name written in config.yaml must
not import modules or follow attributes the file chooses (``difftools.checkpoint:os.system`` with
keyword arguments would run a shell command). Only ``nn.Module`` classes decorated with
:func:`register_rebuildable` can be rebuilt, looked up by their exact ``"module:QualName"``. The
built-in classes register themselves when their module is imported; ``_BUILTIN_MODEL_MODULES``
lists those modules by fixed name, so nothing a config file says is ever imported.

It sits in ``difftools.models`` (below :mod:`difftools.checkpoint`) so that model modules can
register themselves without importing the checkpoint code.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

_REBUILDABLE: dict[str, type[torch.nn.Module]] = {}
_BUILTIN_MODEL_MODULES = ("difftools.models.dit", "difftools.models.precond", "difftools.models.classifier",
                          "difftools.models.autoencoders.trainable", "difftools.models.token_transformer",
                          "difftools.models.lora")


class UnregisteredClassError(LookupError):
    """A checkpoint names a class that is not registered for rebuilding (``difftools.checkpoint``
    turns it into a ``CheckpointError`` naming the file)."""


def class_path(obj: Any) -> str:
    """``"module:QualName"`` of a class or of an instance's class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def register_rebuildable(cls: type) -> type:
    """Class decorator: let checkpoints rebuild ``cls`` as ``cls(**model.config())``.

    ``cls`` must be an ``nn.Module`` subclass with a ``config()`` method returning its constructor
    arguments. It is registered under ``class_path(cls)`` (e.g. ``"difftools.models.dit:DiT"``),
    the name ``checkpoint_meta`` writes; a module outside difftools must be imported before
    ``difftools.load`` so that its classes are registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"register_rebuildable: {cls!r} is not an nn.Module subclass")
    if not callable(getattr(cls, "config", None)):
        raise TypeError(f"register_rebuildable: {cls.__qualname__} has no config() method returning its "
                        "constructor arguments")
    _REBUILDABLE[class_path(cls)] = cls
    return cls


def _load_builtin_models() -> None:
    for module in _BUILTIN_MODEL_MODULES:
        importlib.import_module(module)


def rebuildable_classes() -> list[str]:
    """Names a checkpoint's ``model_class`` may take."""
    _load_builtin_models()
    return sorted(_REBUILDABLE)


def rebuildable_class(name: Any, key: str = "model_class") -> type[torch.nn.Module]:
    """The registered class called ``name`` (exact match); anything else is an
    :class:`UnregisteredClassError` (``key`` names the config entry in the message)."""
    if isinstance(name, str) and name not in _REBUILDABLE:
        _load_builtin_models()
    cls = _REBUILDABLE.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnregisteredClassError(
            f"refusing {key} {name!r}: not a class registered for rebuilding from a checkpoint (registered: "
            f"{', '.join(rebuildable_classes())}). A class of your own needs "
            "@difftools.models.registry.register_rebuildable and its module imported before loading")
    return cls


def rebuildable_name(obj: Any) -> str:
    """The registry name of ``obj``'s class; a TypeError if a checkpoint could not rebuild it."""
    name = class_path(obj)
    if name not in _REBUILDABLE:
        _load_builtin_models()
    if _REBUILDABLE.get(name) is not (obj if isinstance(obj, type) else type(obj)):
        raise TypeError(f"{name} is not registered for rebuilding from a checkpoint: decorate it with "
                        "@difftools.models.registry.register_rebuildable (registered: "
                        f"{', '.join(rebuildable_classes())})")
    return name
