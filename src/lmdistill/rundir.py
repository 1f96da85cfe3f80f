"""The run-directory format: what a run leaves on disk, how it is named, and how it is read back.

A run directory holds:

- ``config.yaml``: the resolved config (what makes a directory a run directory);
- ``metrics.jsonl``: the training log, one JSON object a line (cumulative ``flops``, ``eval_*``);
- ``train_summary.json``: written last by ``fit``, so its presence means the run finished;
- ``model/``: the final model (a Hugging Face directory);
- ``eval.json``: the evaluation (``lmdistill eval``).

An evaluation-only run directory (``lmdistill eval MODEL --config``) holds config.yaml and
eval.json. Sweeps name a grid point's directory after its varied keys (:func:`run_name`), reports
label settings with the same short keys (:func:`short_keys`). Sweep, report, evaluate and
quickstart read run directories only through this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmdistill.config import ConfigError, RunConfig, to_dict
from lmdistill.io import read_yaml_mapping

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
EVAL = "eval.json"
MODEL = "model"


class RunDirError(ValueError):
    """A run directory is missing or unreadable; the message names the file (and line)."""


# --------------------------------------------------------------------------- what a directory is


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a run directory (it holds the resolved config.yaml)."""
    return (Path(path) / CONFIG).is_file()


def is_finished(run_dir: str | Path) -> bool:
    """A run is finished when its train_summary.json exists (fit writes it last)."""
    return (Path(run_dir) / SUMMARY).is_file()


def has_training(run_dir: str | Path) -> bool:
    """Whether a training run wrote to `run_dir` (its log or its summary), finished or not."""
    return (Path(run_dir) / METRICS).exists() or (Path(run_dir) / SUMMARY).exists()


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories among `paths`: each path itself, or (a sweep directory) its subdirectories that are runs.

    In order, each once (by resolved path); a path that is neither is an error.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if is_run_dir(c)) if p.is_dir() else []
        if not children:
            raise RunDirError(f"{p}: not a run directory (no {CONFIG}) and holds none")
        out.extend(children)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


# --------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict | None:
    """A JSON file of a run directory (None when absent); invalid JSON is an error naming file:line."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_eval(run_dir: str | Path) -> dict | None:
    """The run's eval.json, or None."""
    return read_json(Path(run_dir) / EVAL)


def read_summary(run_dir: str | Path) -> dict | None:
    """The run's train_summary.json, or None."""
    return read_json(Path(run_dir) / SUMMARY)


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl (`path`: the file or its run directory; empty when absent).

    A bad line is an error naming file:line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{path}:{i}: expected a JSON object")
        rows.append(row)
    return rows


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.yaml as a nested mapping (not validated: a report reads configs of any version)."""
    if not (Path(run_dir) / CONFIG).is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no {CONFIG})")
    return read_yaml_mapping(Path(run_dir) / CONFIG, RunDirError, missing="not a run directory")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping → dotted keys; lists become tuples (hashable, comparable)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        tree = tuple(tree)
    return {prefix.rstrip("."): tree}


def check_same_config(cfg: RunConfig) -> None:
    """Refuse to reuse a run directory written with a different config (keys both configs have)."""
    saved_path = cfg.run_dir / CONFIG
    if not saved_path.exists():
        return
    saved = flatten(read_config(cfg.run_dir))
    new = flatten(to_dict(cfg))
    differ = [k for k in new if k in saved and k != "output_dir" and saved[k] != new[k]]
    if differ:
        shown = ", ".join(f"{k}: {saved[k]!r} there, {new[k]!r} now" for k in differ[:3])
        raise ConfigError(
            f"{cfg.run_dir} was made with a different config ({shown}); remove it or sweep into another directory (-o)"
        )


# --------------------------------------------------------------------------- names


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Dotted key → short name: its last part (``method.name`` → ``method``), the whole key where two would clash."""
    last = {k: ("method" if k == "method.name" else k.rsplit(".", 1)[-1]) for k in keys}
    counts: dict[str, int] = {}
    for v in last.values():
        counts[v] = counts.get(v, 0) + 1
    return {k: (v if counts[v] == 1 else k) for k, v in last.items()}


def _value_slug(value: str) -> str:
    if "/" in value:  # a path: its file name without suffix
        value = Path(value.rstrip("/")).stem or value
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", value).strip("_") or "_"


def run_name(varied: dict[str, str]) -> str:
    """Directory name of a grid point: ``lam_prime=0.5__seed=1`` (``run`` when nothing varies)."""
    short = short_keys(list(varied))
    return "__".join(f"{short[k]}={_value_slug(v)}" for k, v in varied.items()) or "run"
