"""Typed checks for values read from files and command lines: a YAML ``"false"`` is not a bool,
``classes: Conv2d`` is not a list, ``version: one`` is not an int. Each failure is one
:class:`DiffquantError` line naming where the value came from and what to write instead."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from diffquant.errors import DiffquantError

__all__ = ["check_value", "contained", "read_json", "typed_fields"]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        plural = {str: "strings", int: "integers", float: "numbers", bool: "true/false values", dict: "mappings"}
        return (f"a list of {plural.get(args[0], _describe(args[0]))}") if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a mapping",
        list: "a list",
    }
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to the annotated container type)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _matches(value, arg)
            if ok:
                return True, v
        return False, value
    if origin in (list, tuple):
        return _sequence(value, tp, origin)
    if origin is dict:
        return isinstance(value, dict), value
    return _scalar(value, tp)


def _sequence(value: Any, tp: Any, origin: type) -> tuple[bool, Any]:
    """A list or tuple whose every item matches the annotation's item type."""
    if not isinstance(value, (list, tuple)):
        return False, value
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    items = []
    for item in value:
        ok, v = _matches(item, args[0]) if args else (True, item)
        if not ok:
            return False, value
        items.append(v)
    return True, origin(items)


def _scalar(value: Any, tp: Any) -> tuple[bool, Any]:
    """bool, int (not a bool), a finite float (ints accepted), str, or any other class."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def check_value(value: Any, tp: Any, where: str, hint: str = "") -> Any:
    """``value`` if it has type ``tp`` (containers converted to the annotated kind), else a
    DiffquantError: ``WHERE: expected ..., got ...[; HINT]``."""
    ok, v = _matches(value, tp)
    if not ok:
        raise DiffquantError(f"{where}: expected {_describe(tp)}, got {value!r}" + (f"; {hint}" if hint else ""))
    return v


def typed_fields(cls: type, values: dict, where: str) -> dict:
    """``values`` checked against dataclass ``cls``'s annotations: unknown keys, wrong types and
    a ``version`` other than the class's own are refused, naming ``where`` and the key."""
    if not isinstance(values, dict):
        raise DiffquantError(f"{where}: expected a mapping of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DiffquantError(f"{where}: unknown option(s) {unknown}; options: {sorted(fields)}")
    out = {k: check_value(v, hints[k], f"{where}: {k}") for k, v in values.items()}
    if "version" in out and "version" in fields and out["version"] != fields["version"].default:
        raise DiffquantError(
            f"{where}: version {out['version']} is not one this diffquant reads (it reads version "
            f"{fields['version'].default}); "
            "write the options for that version or upgrade diffquant"
        )
    return out


def contained(folder: str | Path, name: Any, where: str) -> Path:
    """``folder / name`` if it stays inside ``folder`` (no absolute path, no ``..`` escape,
    no link out), else a DiffquantError naming ``where``."""
    if not isinstance(name, str) or not name:
        raise DiffquantError(f"{where}: expected a file name inside {folder}, got {name!r}")
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root):
        raise DiffquantError(f"{where}: {name!r} points outside its folder {folder}; name a file inside that folder")
    return path


def read_json(path: str | Path, hint: str, required: tuple[str, ...] = ()) -> dict:
    """The JSON object in ``path``, with ``required`` keys; anything else (missing, unreadable,
    not JSON, not an object, a key missing) is one DiffquantError line ending in ``hint``."""
    path = Path(path)
    if not path.is_file():
        raise DiffquantError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'does not exist'}; {hint}")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise DiffquantError(f"{path}: not a text file; {hint}") from None
    except json.JSONDecodeError as e:
        raise DiffquantError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {hint}") from None
    if not isinstance(data, dict):
        raise DiffquantError(f"{path}: expected a JSON object, got a {type(data).__name__}; {hint}")
    missing = [k for k in required if k not in data]
    if missing:
        raise DiffquantError(f"{path}: missing key(s) {missing}; {hint}")
    return data
