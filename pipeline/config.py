"""Typed configs: dataclasses loaded from YAML, dotted ``key=value`` overrides, unknown keys rejected.

Every tool builds its config the same way::

    cfg = load_config(TrainConfig, "configs/burgers1d.yaml", ["optim.lr=3e-4", "seed=1"])

Each config dataclass validates itself in ``__post_init__`` and raises :class:`ConfigError`
naming the option and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")  # a config dataclass


class ConfigError(ValueError):
    """A config value or key that is not what the dataclass expects."""


def check(condition: bool, option: str, expected: str, value: Any) -> None:
    """Raise one clear ConfigError if ``condition`` is false."""
    if not condition:
        raise ConfigError(f"option '{option}': expected {expected}, got {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"option '{where}': {value!r} fits none of {tp}"
        )
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"option '{where}': expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"option '{where}': expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"option '{where}': expected a mapping, got {value!r}")
        args = get_args(tp)
        value_tp = args[1] if len(args) == 2 else Any
        return {key: _coerce(v, value_tp, f"{where}.{key}") for key, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"option '{where}': expected a mapping of {tp.__name__} keys, got {value!r}"
            )
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"option '{where}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"option '{where}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"option '{where}': expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads "1e-3" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"option '{where}': expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"option '{where}': expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[ConfigT], data: object, where: str = "") -> ConfigT:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with the list of valid ones.

    ``data`` may be anything (parsed YAML or JSON): what is not a mapping is refused by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(valid)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without default was not given
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists, so it round-trips through YAML/JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON of a config (or plain dict)."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def without_keys(data: dict[str, Any], keys: typing.Iterable[str]) -> dict[str, Any]:
    """A copy of a nested dict without the dotted ``keys`` (``a.b`` drops ``data["a"]["b"]``)."""
    keys = frozenset(keys)
    out = {}
    for name, value in data.items():
        if name in keys:
            continue
        if isinstance(value, dict):
            value = without_keys(
                value, (k.split(".", 1)[1] for k in keys if k.startswith(f"{name}."))
            )
        out[name] = value
    return out


def with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (nested) with the keys it lacks taken from ``defaults``: a config written before
    an option existed reads as that option's default, which is what the older version did."""
    out = dict(saved)
    for name, value in defaults.items():
        if name not in out:
            out[name] = value
        elif isinstance(value, dict) and isinstance(out[name], dict):
            out[name] = with_defaults(out[name], value)
    return out


def config_diff(saved: Any, expected: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: saved != expected'."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(saved) | set(expected)):
            out += config_diff(saved.get(key), expected.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == expected else [f"{prefix.rstrip('.')}: {saved!r} != {expected!r}"]


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply dotted ``a.b.c=value`` overrides; values are parsed as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(
    cls: type[ConfigT], path: str | Path | None = None, overrides: typing.Iterable[str] = ()
) -> ConfigT:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded or {}
    return from_dict(cls, apply_overrides(data, overrides))
