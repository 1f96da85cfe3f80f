"""Reading a run's config (YAML + overrides) and writing the resolved one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from lmdistill.config.build import MethodConfigs, build, merge, parse_overrides
from lmdistill.config.errors import ConfigError
from lmdistill.config.run import RunConfig
from lmdistill.io import atomic_write_text, read_yaml_mapping


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                method_configs: MethodConfigs) -> RunConfig:
    """Read a YAML file (or start from defaults), apply `key=value` overrides, validate.

    `method_configs` resolves the ``method`` section (:data:`lmdistill.methods.METHOD_CONFIGS`;
    :func:`lmdistill.methods.load_config` passes it).
    """
    data: dict = {}
    if path is not None:
        data = read_yaml_mapping(Path(path), ConfigError, missing="no such config file")
    data = merge(data, parse_overrides(overrides or []))
    try:
        return build(RunConfig, data, method_configs=method_configs)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples as lists), ready for YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
