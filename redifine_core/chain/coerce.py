"""Plain dicts (TOML tables, run.json) to frozen config dataclasses and back, with errors that name the dotted key.

Kept as our own small code rather than a dependency (dacite, pydantic): the configs are a few flat dataclasses, the
rules are strict (unknown keys and wrong types are errors, ints are not bools, numbers widen to float, lists become
tuples) and every message must name the key as the user wrote it (``methods[1].cond_drop``, ``train.steps``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Optional, Union

import numpy as np


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """An int or float (numpy too) that is not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def jsonable(obj: Any) -> Any:
    """Dicts, lists and numpy scalars made JSON-ready (tuples become lists)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, hints_for: Callable[[type], dict]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, hints_for)
            except ValueError:
                continue
        raise ValueError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"{path}: {value!r} is not one of {typing.get_args(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if is_int(value):
            return int(value)
    elif tp is float:
        if is_number(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if not args:
                return tuple(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{path}[{i}]", hints_for) for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(_coerce(v, a, f"{path}[{i}]", hints_for) for i, (v, a) in enumerate(zip(value, args)))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, path, hints_for)
    else:  # unknown annotation: accept as is
        return value
    raise ValueError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, d: Any, path: str = "", hints_for: Optional[Callable[[type], dict]] = None) -> Any:
    """Build dataclass ``cls`` from dict ``d``: unknown keys and wrong types raise ValueError naming ``path.key``.

    ``hints_for(cls)`` returns the field types to coerce to (default: ``typing.get_type_hints``); a caller uses it to
    give a field annotated ``Any`` its real class.
    """
    hints_for = hints_for or typing.get_type_hints
    where = path or "config"
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table/dict, got {d!r}")
    hints = hints_for(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in d if k not in names]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ValueError(f"unknown key {key!r} (allowed in {where}: {', '.join(names)})")
    kwargs = {}
    for k, v in d.items():
        key = f"{path}.{k}" if path else k
        kwargs[k] = _coerce(v, hints.get(k, Any), key, hints_for)
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required field
        raise ValueError(f"{where}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from None


def config_diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (``methods[1].cfg``, ``train.steps``, ...)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(p)
            else:
                out.extend(config_diff(a[k], b[k], p))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [path or "<root>"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(config_diff(x, y, f"{path}[{i}]"))
        return out
    return [] if a == b else [path or "<root>"]
