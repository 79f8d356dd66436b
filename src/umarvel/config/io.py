"""YAML recipes and `key=value` overrides -> typed dataclasses, and the resolved config back to YAML."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from umarvel.config.schema import RunConfig
from umarvel.errors import UserError
from umarvel.files import atomic_write

T = TypeVar("T")


class ConfigError(UserError):
    """A recipe or override that does not fit the schema; the message names the key."""


# A decimal number as YAML 1.2 writes one. PyYAML reads YAML 1.1, where a float needs a dot and a signed
# exponent, so `1e-4` or `5E3` arrive as strings; a float field takes them as the numbers they spell.
# Nothing else written as a string counts (no `nan` / `inf`, no `1_000`), and int fields take none.
_DECIMAL = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _check(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        key_type, value_type = args or (Any, Any)
        return {
            _check(k, key_type, f"{key} key"): _check(v, value_type, f"{key}.{k}") for k, v in value.items()
        }
    if origin in (list, tuple):
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {annotation!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known keys: {', '.join(sorted(fields))})")
    values = {name: _check(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to the nested dict `data`."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a group")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`into` updated with `extra`, nested mappings merged key by key."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def load_config(
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    cls: type[T] = RunConfig,  # type: ignore[assignment]
    base: Mapping[str, Any] | None = None,
) -> T:
    """Read a YAML recipe (only the keys that differ from the defaults), merge the mapping `base` over
    it (a pipeline stage's inline `config:`), apply overrides, validate."""
    data: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path} not found")
        try:
            loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{path}: not UTF-8 (byte {error.start + 1}); save the recipe as UTF-8"
            ) from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from None
        if loaded is None:
            raise ConfigError(f"{path}: the recipe is empty (write the keys that differ from the defaults)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
        data = loaded
    _merge(data, base or {})
    for override in overrides:
        apply_override(data, override)
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:

    with atomic_write(path) as handle:
        yaml.safe_dump(to_dict(config), handle, sort_keys=False)
