"""Typed configuration nodes: check every value of a config node against its declared type before
anything runs, and name the key, the value and the expected type when one does not fit.

Hydra's override grammar parses ``trainer.max_steps=abc`` to the string ``'abc'``, ``2.5`` to a float
and ``maybe`` to a string; without a check these reach the training loop (``'<' not supported``),
a format string, or AdamW, or are silently coerced (``range(2.5)`` fails, ``bool('maybe')`` is true).
Here the declared annotation of each field decides:

========================  ===========================================================================
annotation                accepted (and converted)
========================  ===========================================================================
``int``                   int; a float without fraction (``2.0`` -> 2). Never bool or str.
``float``                 int or float (-> float). Never bool or str.
``bool``                  ``true`` / ``false`` only (not 0/1, not strings)
``str``                   str only
``Path``                  str or ``os.PathLike`` (-> Path)
``X | None``              null, or what X accepts
``tuple[X, Y]``           a list/tuple of exactly that many items, each checked (-> tuple)
``tuple[X, ...]``         a list/tuple of any length, each item an X (-> tuple)
``list[X]``, Sequence[X]  a list/tuple, each item an X (-> list)
``dict`` / ``Mapping``    a mapping (not checked further)
``Literal[a, b]``         one of the listed values
anything else / absent    passed through unchecked
========================  ===========================================================================

:func:`from_mapping` builds a dataclass from a mapping (a config node); :func:`check_node` checks a
mapping against a schema (``{key: annotation or nested schema}``), for config files without a
dataclass; :func:`signature_schema` derives such a schema from a function's typed keywords.
No Hydra import: OmegaConf containers work because they are ``Mapping`` / ``Sequence`` instances.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

__all__ = ["ConfigError", "check_node", "check_value", "from_mapping", "signature_schema"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value of the wrong type, outside its choices, or an unknown key. The message names
    the full key (``trainer.max_steps``), the value given and what was expected."""


class _Mismatch(Exception):
    """Internal: the value does not fit; ``key`` is the innermost key (with list indices)."""

    def __init__(self, key: str, value, expected: str):
        super().__init__(key)
        self.key, self.value, self.expected = key, value, expected


def _describe(tp) -> str:
    """Human wording of an annotation, e.g. 'an integer', 'a list of 2 numbers', 'a string or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if args and all(a == args[0] for a in args):
            return f"a list of {len(args)} {_plural(args[0])}"
        return "a list of (" + ", ".join(_describe(a) for a in args) + ")"
    if origin in (list, Sequence) or tp in (list, Sequence):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, _describe(tp))


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _convert(key: str, value, tp):
    """``value`` as annotation ``tp`` (see the module table), or raise _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if origin is Literal:
        # `True in (1, 2)` holds in Python; compare types too so a bool never passes for an int choice
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(key, value, _describe(tp))
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, value, arg)
            except _Mismatch as err:
                if err.key != key:  # the container type fitted, an item inside did not: say which
                    raise
        raise _Mismatch(key, value, _describe(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(key, value, _describe(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch(key, value, _describe(tp))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch(key, value, _describe(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(key, value, _describe(tp))
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Mismatch(key, value, _describe(tp))
    if origin is tuple:
        if not _is_list(value):
            raise _Mismatch(key, value, _describe(tp))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise _Mismatch(key, value, _describe(tp))
        return tuple(_convert(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=False)))
    if origin in (list, Sequence) or tp in (list, Sequence):
        if not _is_list(value):
            raise _Mismatch(key, value, _describe(tp))
        return [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        if isinstance(value, Mapping):
            return value
        raise _Mismatch(key, value, _describe(tp))
    return value


def _message(err: _Mismatch) -> str:
    value, got = err.value, type(err.value).__name__
    if isinstance(value, float) and err.expected.startswith("an integer"):
        got = "float with a fraction"
    elif _is_list(value):
        got = f"list of {len(value)} item{'s' if len(value) != 1 else ''}"
        value = list(value)
    elif isinstance(value, Mapping):
        got, value = "mapping", dict(value)
    article = "an" if got[0] in "aeiou" else "a"
    return f"{err.key}={value!r} is {article} {got}; expected {err.expected}"


def check_value(key: str, value, annotation, choices: Sequence | None = None):
    """``value`` converted to ``annotation`` (module table), else :class:`ConfigError` naming
    ``key``, the value and the expected type. ``choices``: the allowed values, checked after."""
    try:
        value = _convert(key, value, annotation)
    except _Mismatch as err:
        raise ConfigError(_message(err)) from None
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not a valid choice; expected one of "
                          + ", ".join(repr(c) for c in choices))
    return value


def _join(node: str, key: str) -> str:
    return f"{node}.{key}" if node else key


def check_node(mapping: Mapping, schema: Mapping[str, Any], node: str = "",
               choices: Mapping[str, Sequence] | None = None, allow_unknown: bool = False) -> dict:
    """Check the mapping ``mapping`` (config node ``node``, '' for the top level) against ``schema``:
    ``{key: annotation}`` or ``{key: nested schema dict}`` (a nested node may be null). ``choices``:
    ``{key: allowed values}``, dotted keys for nested nodes (``"align.features"``). Returns a plain
    dict of the converted values (keys absent from the schema kept as given when ``allow_unknown``,
    else a ConfigError)."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(_message(_Mismatch(node or "config", mapping, "a mapping")))
    choices = choices or {}
    unknown = sorted(set(mapping) - set(schema))
    if unknown and not allow_unknown:
        raise ConfigError(f"unknown {node or 'config'} option(s) {unknown}; valid: {sorted(schema)}")
    out = {}
    for key in mapping:
        value, full = mapping[key], _join(node, key)
        if key not in schema:
            out[key] = value
        elif isinstance(schema[key], Mapping):
            inner = {k[len(key) + 1:]: v for k, v in choices.items() if k.startswith(f"{key}.")}
            out[key] = None if value is None else check_node(value, schema[key], full, inner, allow_unknown)
        else:
            out[key] = check_value(full, value, schema[key], choices.get(key))
    return out


def from_mapping(cls: type[T], mapping: Mapping, node: str,
                 choices: Mapping[str, Sequence] | None = None) -> T:
    """An instance of the dataclass ``cls`` from the config node ``mapping``, every value checked
    against its field's annotation (unknown keys are an error; missing keys take the defaults).
    E.g. ``from_mapping(TrainerConfig, {"max_steps": "abc"}, node="trainer")`` raises
    ``ConfigError: trainer.max_steps='abc' is a str; expected an integer``."""
    if not is_dataclass(cls):
        raise TypeError(f"from_mapping needs a dataclass, got {cls!r}")
    hints = typing.get_type_hints(cls)
    schema = {f.name: hints.get(f.name, Any) for f in fields(cls) if f.init}
    return cls(**check_node(mapping, schema, node, choices))


def signature_schema(fn: Callable, skip: Sequence[str] = ()) -> dict[str, Any]:
    """``{keyword: annotation}`` of ``fn``'s parameters (unannotated ones are unchecked), for
    checking a config node that is passed to ``fn`` as keywords."""
    hints = typing.get_type_hints(fn)
    return {name: hints.get(name, Any) for name, p in inspect.signature(fn).parameters.items()
            if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
