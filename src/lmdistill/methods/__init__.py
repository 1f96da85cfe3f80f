"""Training methods, registered by name (`method.name=...`).

:data:`METHOD_CONFIGS` (name → options dataclass) is what :mod:`lmdistill.config` resolves the
``method`` section through; :func:`load_config` is the config loader every entry point calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from lmdistill import config
from lmdistill.config import MethodConfig, RunConfig
from lmdistill.methods import (distill, distillm, hidden, minillm, preference, reward_model, rlaif,  # noqa: F401
                               self_improve, sequence, sft)  # (registers)
from lmdistill.methods.base import METHODS, ROWS, Loss, Method, RunContext, Term, make_method, method_rows, register


class _MethodConfigs(Mapping[str, type[MethodConfig]]):
    """Every registered method's options dataclass, by name: a live view of :data:`METHODS`."""

    def __getitem__(self, name: str) -> type[MethodConfig]:
        return METHODS[name].config_class

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)


METHOD_CONFIGS: Mapping[str, type[MethodConfig]] = _MethodConfigs()
"""Method name → its options dataclass (``Method.config_class``), for ``config.load_config`` / ``config.build``."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults), apply ``key=value`` overrides, validate every
    section, the ``method`` one against the registered method's options (:data:`METHOD_CONFIGS`)."""
    return config.load_config(path, overrides, method_configs=METHOD_CONFIGS)


__all__ = ["METHODS", "METHOD_CONFIGS", "ROWS", "Loss", "Method", "RunContext", "Term", "load_config", "make_method",
           "method_rows", "register"]
