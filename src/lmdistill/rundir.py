"""The run-directory format: what a run leaves on disk, how it is named, and how it is read back.

A run directory holds:

- ``config.yaml``: the resolved config (what makes a directory a run directory);
- ``metrics.jsonl``: the training log, one JSON object a line (cumulative ``flops``, ``eval_*``);
- ``train_summary.json``: written last by ``fit``, so its presence means the run finished;
- ``model/``: the final model (a Hugging Face directory);
- ``adapter/``: a LoRA student's peft adapter (``student.lora``; ``model/`` is then the merged model);
- ``eval.json``: the evaluation (``lmdistill eval``);
- ``.lock``: locked (``flock``) by the one process that trains in the directory, for that
  process's whole life (:func:`claim`); it holds that process's id.

An evaluation-only run directory (``lmdistill eval MODEL --config``) holds config.yaml and
eval.json. Sweeps name a grid point's directory after its varied keys (:func:`run_name`), reports
label settings with the same short keys (:func:`short_keys`). Sweep, report, evaluate and
quickstart read run directories only through this module.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from lmdistill.config import ConfigError, RunConfig, to_dict
from lmdistill.io import UserError, read_yaml_mapping, utf8

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
EVAL = "eval.json"
MODEL = "model"
ADAPTER = "adapter"
LOCK = ".lock"


class RunDirError(UserError, ValueError):
    """A run directory is missing or unreadable; the message names the file (and line)."""


class InUse(ConfigError):
    """Another process holds the lock of a run directory (or of an elicit output); the fix is to wait or to
    write elsewhere."""


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
        return json.loads(utf8(path.read_bytes(), path, RunDirError))
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
    for i, line in enumerate(utf8(path.read_bytes(), path, RunDirError).splitlines(), 1):
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


SAME_CONFIG_IGNORES = ("output_dir", "train.resume")
"""Keys that may differ between a run directory's config.yaml and a run reusing the directory: where it
is, and whether to continue from its checkpoint, do not change what the run is."""


def check_same_config(cfg: RunConfig) -> None:
    """Refuse to reuse a run directory written with a different config (keys both configs have)."""
    saved_path = cfg.run_dir / CONFIG
    if not saved_path.exists():
        return
    saved = flatten(read_config(cfg.run_dir))
    new = flatten(to_dict(cfg))
    differ = [k for k in new if k in saved and k not in SAME_CONFIG_IGNORES and saved[k] != new[k]]
    if differ:
        shown = ", ".join(f"{k}: {saved[k]!r} there, {new[k]!r} now" for k in differ[:3])
        raise ConfigError(
            f"{cfg.run_dir} was made with a different config ({shown}); to start over, remove it "
            f"(rm -r {cfg.run_dir}) or write to another directory (output_dir=DIR; sweep -o DIR; quickstart --out DIR)"
        )


# --------------------------------------------------------------------------- one process per directory


class FileLock:
    """An exclusive ``flock`` on `path` (created if absent), taken without waiting; :class:`InUse`
    (`busy`, and the holder's process id) when another process holds it. The file holds the holder's
    id. Released by :meth:`close`, or by the kernel when the process ends, however it ends."""

    def __init__(self, path: str | Path, *, busy: str) -> None:
        self.path = Path(path)
        self._file: TextIO = open(self.path, "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip()
            self._file.close()
            raise InUse(f"{busy} (process {holder or '?'})") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def holds(self, path: Path) -> bool:
        """Whether this lock is still on the file at `path` (not on one since deleted or replaced)."""
        try:
            return not self._file.closed and os.stat(path).st_ino == os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def close(self) -> None:
        """Release the lock."""
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


_claimed: dict[Path, FileLock] = {}
"""Run directories this process holds (resolved path → lock), until it exits."""


def claim(cfg: RunConfig, *, create: bool = False) -> None:
    """Make `cfg.run_dir` this process's, before anything is written to it: refuse a directory another
    process holds (:class:`InUse`; its ``.lock`` stays locked by this process until it exits) and one
    written with a different config (:func:`check_same_config`).

    A directory that does not exist yet is left alone (nothing is created before the run's inputs are
    checked), unless `create`: then it is made, locked and checked (another process may have made it
    since the first call). Claiming a directory this process holds again is a no-op lock-wise.
    """
    run_dir = cfg.run_dir
    if not run_dir.is_dir():
        if not create:
            return
        if run_dir.exists():
            raise RunDirError(f"{run_dir}: exists and is not a directory; set output_dir to a directory")
        run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    held = _claimed.get(key)
    if held is None or not held.holds(run_dir / LOCK):
        if held is not None:
            held.close()
        _claimed[key] = FileLock(run_dir / LOCK, busy=f"{run_dir} is in use by another lmdistill run: wait for "
                                 "it to finish, or give this run another directory (output_dir=DIR)")
    check_same_config(cfg)


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
