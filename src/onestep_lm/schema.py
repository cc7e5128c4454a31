"""Dataclasses from plain mappings (parsed YAML), with checks whose errors name the key: the machinery under
config.py, which holds the schema itself.

build(cls, raw, where) makes a `cls` from a mapping: an unknown key names the allowed ones, a value of the wrong
type names the expected type (int, float, str, bool, lists, mappings, nested dataclasses, `X | None`), and a
value outside a class's CHOICES names the allowed values. to_plain() turns a dataclass back into plain data.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import ConfigError


def build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {where or '(top level)'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"unknown config key '{key}'; allowed keys: {', '.join(names)}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f"{where}.{name}" if where else name)
    obj = cls(**values)
    for name, allowed in getattr(cls, "CHOICES", {}).items():
        if getattr(obj, name) not in allowed:
            raise ConfigError(f"config key {where}.{name}: {getattr(obj, name)!r} is not one of "
                              f"{', '.join(map(str, allowed))}")
    return obj


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"config key {where}: {value!r} is not of type {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where}: {value!r} is not a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where}: {value!r} is not a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {where}: {value!r} is not of type {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {type(None): "null", int: "integer", float: "number", str: "string", bool: "boolean (true/false)"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def positive(key: str, value: float, minimum: float | None = None) -> None:
    if minimum is None and value <= 0:
        raise ConfigError(f"config key {key}: {value} must be > 0")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config key {key}: {value} must be >= {minimum}")


def divides(name: str, width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"config key {name}.heads: {heads} must divide {name}.width ({width})")
