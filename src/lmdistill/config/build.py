"""Dataclasses from nested mappings: type coercion naming the key, unknown keys refused, overrides.

A method's options are validated against that method's own dataclass, selected by
``method.name`` through the ``method_configs`` registry the caller hands in (name → a
:class:`MethodConfig` subclass; :data:`lmdistill.methods.METHOD_CONFIGS`). Config imports no
method: ``method.alpha`` is an error for SFT and a float for KD because the registry says so.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from lmdistill.config.errors import ConfigError
from lmdistill.config.run import MethodConfig

MethodConfigs = Mapping[str, type[MethodConfig]]
"""Method name → its options dataclass (a MethodConfig subclass)."""


def method_config_class(name: str, method_configs: MethodConfigs | None, prefix: str = "method.") -> type[MethodConfig]:
    """The options dataclass of method `name`; an error naming ``method.name`` when it is not registered."""
    if method_configs is None:
        raise TypeError(f"building the {prefix.rstrip('.') or 'method'} section needs the method registry: pass "
                        "method_configs=lmdistill.methods.METHOD_CONFIGS (or call lmdistill.methods.load_config)")
    if name not in method_configs:
        raise ConfigError(f"{prefix}name: unknown method {name!r}; known: {', '.join(sorted(method_configs))}")
    return method_configs[name]


def _coerce(value: Any, tp: Any, key: str, method_configs: MethodConfigs | None) -> Any:
    """Check / convert one value to the annotated type, naming `key` on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, method_configs)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", method_configs) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]", method_configs) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=key + ".", method_configs=method_configs)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, data: Any, prefix: str = "", *, method_configs: MethodConfigs | None = None) -> Any:
    """Build dataclass `cls` from a (possibly nested) mapping; unknown keys are errors.

    A ``method`` mapping (a field typed :class:`MethodConfig`) is built as the class that
    `method_configs` gives for its ``name`` (default ``sft``); without a registry it is a TypeError.
    """
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    if cls is MethodConfig:
        cls = method_config_class(str(data.get("name", "sft")), method_configs, prefix or "method.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(str(k), names, n=1)
        more = f" (did you mean {prefix}{hint[0]}?)" if hint else f"; known: {', '.join(sorted(names))}"
        raise ConfigError(f"unknown config key {prefix}{k}{more}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", method_configs) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    return obj


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.lr=3e-4", "method.name=kd"]` → nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        _set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it, section by section (nested mappings merged, other values replaced)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
