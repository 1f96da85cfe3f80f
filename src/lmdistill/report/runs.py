"""Reading run directories for a report: a :class:`Run` per directory, through :mod:`lmdistill.rundir`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmdistill import rundir
from lmdistill.rundir import RunDirError, find_runs  # noqa: F401  (the report reads sweep directories too)

ReportError = RunDirError
"""What ``lmdistill report`` stops with: a run directory missing or unreadable, or no results (the message says which)."""


@dataclass
class Run:
    """What one run directory holds."""

    path: Path
    config: dict[str, Any]
    """Flattened resolved config: dotted key → value."""
    metrics: list[dict] = field(default_factory=list)
    eval: dict | None = None
    summary: dict | None = None

    @property
    def seed(self) -> Any:
        return self.config.get("train.seed")

    @property
    def method(self) -> str:
        return str(self.config.get("method.name", "?"))

    @property
    def final_flops(self) -> float | None:
        for row in reversed(self.metrics):
            if "flops" in row:
                return float(row["flops"])
        return None


def load_run(path: str | Path) -> Run:
    """Read one run directory (config.yaml required; the other files when present)."""
    path = Path(path)
    return Run(path=path, config=rundir.flatten(rundir.read_config(path)), metrics=rundir.read_metrics(path),
               eval=rundir.read_eval(path), summary=rundir.read_summary(path))
