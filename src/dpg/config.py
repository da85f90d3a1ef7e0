"""One config source: typed dataclasses, loaded from YAML, overridable on the command line.

    cfg = load_config(AttributeConfig, "exp.yaml", ["recipe.lr=1e-4", "target.model=tiny-llama"])

Every key is checked against the dataclass: an unknown key or a value of the wrong type is a
DpgError that names the key. Each dataclass field carries a one-line comment in its source;
`describe` turns those comments into the `--help` listing, so docs and code cannot drift.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from dpg.errors import DpgError

T = TypeVar("T")


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, base: T | None = None
) -> T:
    """Build `cls` from a YAML file (optional) then `key.sub=value` overrides, on top of
    `base` (default: `cls()`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DpgError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise DpgError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DpgError(f"{path}: the top level must be a mapping of keys to values")
        data = loaded or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DpgError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DpgError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _Raw(raw)
    return from_dict(cls, data, base=base)


class _Raw(str):
    """A command-line value: text for a string field, YAML for any other (numbers, lists)."""


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def from_dict(cls: type[T], data: Any, prefix: str = "", base: Any = None) -> T:
    """`cls` with the keys of `data` set on top of `base` (default: `cls()`), so a section
    given in part keeps the defaults its parent chose for the rest."""
    base = cls() if base is None else base
    if not isinstance(data, dict):
        raise DpgError(f"config key {prefix.rstrip('.') or '<top>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in known:
            raise DpgError(f"unknown config key '{prefix}{key}' (known keys here: {', '.join(known)})")
    kwargs = {}
    for name in (n for n in known if n in data):
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], data[name], prefix + name + ".", getattr(base, name))
        else:
            kwargs[name] = _coerce(hints[name], data[name], prefix + name)
    return dataclasses.replace(base, **kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _Raw):
        if tp is str or (origin in (Union, types.UnionType) and str in args and value not in ("null", "~")):
            return str(value)
        value = _parse_scalar(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except DpgError as err:
                errors.append(str(err))
        raise DpgError(errors[0] if len(errors) == 1 else f"config key {key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise DpgError(f"config key {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise DpgError(f"config key {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DpgError(f"config key {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DpgError(f"config key {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DpgError(f"config key {key} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise DpgError(f"config key {key} must be a number, got {value!r}")
        if not math.isfinite(number):  # no setting of dpg means anything at inf or nan
            raise DpgError(f"config key {key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # `pattern=67` on a command line arrives as the integer 67
        raise DpgError(f"config key {key} must be a string, got {value!r}")
    raise DpgError(f"config key {key}: unsupported type {tp}")  # a bug in dpg, not in the config


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) for every field; comments are read from the source.

    Defaults come from an instance (`cls()` unless given), so a section whose default is
    built by a factory (e.g. a recipe with another lr) shows the value that applies."""
    defaults = cls() if defaults is None else defaults
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], prefix + f.name + ".", value)
        else:
            rows.append((prefix + f.name, repr(value) if isinstance(value, str) else str(value), comments.get(f.name, "")))
    return rows


def _field_comments(cls: type) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments
