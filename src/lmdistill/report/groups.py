"""Grouping runs for a report: seeds of one setting, tasks, labels, and the teacher's rows.

- A **group** is the runs whose configs are equal except for the seed (``train.seed``), name,
  directory, logging/checkpoint cadence and the ``eval`` section: the seeds of one setting.
- The **task** of a run is its ``data`` section: ``math`` for the math generator, else the train
  file's name; tasks that would share a name get their differing data keys appended.
- A group's **label** is its method, plus the keys in which it differs from other groups of the same
  method (``feedback-kl lam_prime=0.5``); with more than four such keys, its run name instead.
- An **evaluation-only** directory (``lmdistill eval MODEL``; no training) that is not the teacher is a
  row of its own, ``<model> (untrained)``: e.g. the pruned start every student trains from.
- The **teacher's row** (on top of each table): a run directory given to the report whose model is
  the teacher named in other runs' configs (``teacher.model.path``); otherwise the teacher's numbers
  that ``lmdistill eval`` recorded in the students' eval.json (one per seed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmdistill.report.runs import Run
from lmdistill.rundir import short_keys

IGNORED_KEYS = frozenset({
    "name", "output_dir", "train.seed", "train.resume", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_checkpoints",
})
"""Config keys that do not define a setting (runs differing only in these are seeds of one group)."""
IGNORED_PREFIXES = ("eval.",)
MAX_LABEL_KEYS = 4


def setting_key(run: Run, *, data: bool) -> str:
    """JSON of the config keys that define a setting; with `data=False`, without the data section."""
    items = {
        k: v for k, v in run.config.items()
        if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES) and (data or not k.startswith("data."))
    }
    return json.dumps(sorted(items.items()), default=str)


def task_key(run: Run) -> str:
    return json.dumps(sorted((k, v) for k, v in run.config.items() if k.startswith("data.")), default=str)


def varying(runs: Sequence[Run], keys: Callable[[str], bool]) -> list[str]:
    """Config keys (passing `keys`) whose values differ among the `runs` that have them, in config order.

    A key that some runs' configs lack is an option added to lmdistill after they ran (they ran with its
    default behaviour): it tells them apart only where the runs that have it differ."""
    order: dict[str, None] = {}
    for r in runs:
        for k in r.config:
            if keys(k):
                order.setdefault(k, None)
    return [k for k in order if len({json.dumps(r.config[k], default=str) for r in runs if k in r.config}) > 1]


def short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and "/" in value:
        return Path(value.rstrip("/")).name or value
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def task_labels(runs: Sequence[Run]) -> dict[str, str]:
    """Task key → readable name (``math``, the training file's stem, + differing data keys when needed)."""
    firsts: dict[str, Run] = {}
    for r in runs:
        firsts.setdefault(task_key(r), r)
    base = {}
    for tk, r in firsts.items():
        if r.config.get("data.source") == "math":
            base[tk] = "math"
        else:
            path = r.config.get("data.train_path") or r.config.get("data.eval_path") or "data"
            base[tk] = Path(str(path)).stem
    out = {}
    for tk, name in base.items():
        same = [firsts[t] for t, n in base.items() if n == name]
        extra = varying(same, lambda k: k.startswith("data.") and k not in ("data.train_path", "data.eval_path"))
        out[tk] = name + "".join(f" {k.split('.', 1)[1]}={short_value(firsts[tk].config.get(k))}" for k in extra)
    return out


def _strip_seed(name: str) -> str:
    return re.sub(r"(^|__)seed=[^_]*", "", name).strip("_") or name


def variant_labels(runs: Sequence[Run]) -> dict[str, str]:
    """Setting key without data → label: method + the keys in which it differs from same-method settings."""
    firsts: dict[str, Run] = {}
    for r in runs:
        firsts.setdefault(setting_key(r, data=False), r)
    out = {}
    for vk, r in firsts.items():
        same = [x for x in firsts.values() if x.method == r.method]
        keys = varying(same, lambda k: not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS
                        and not k.startswith("data.") and k != "method.name")
        if len(keys) > MAX_LABEL_KEYS:
            out[vk] = _strip_seed(str(r.config.get("name", r.path.name)))
            continue
        short = short_keys(keys)
        parts = [f"{short[k]}={short_value(r.config.get(k))}" for k in keys]
        out[vk] = r.method + (" " + ", ".join(parts) if parts else "")
    # Settings that still share a label (e.g. differing only in the data section of another task) keep it.
    return out


@dataclass
class Row:
    """One line of the tables: a setting on a task, over its seeds."""

    label: str
    task: str
    runs: list[Run]
    evals: list[dict]
    """eval.json of each seed (for teacher rows from students' records: the teacher block)."""
    teacher: bool = False


def _locations(run: Run) -> set[str]:
    locs = {str((run.path / "model").resolve())}
    if run.config.get("student.path"):
        locs.add(str(Path(str(run.config["student.path"])).resolve()))
        locs.add(str(run.config["student.path"]))
    return locs


def _teacher_paths(runs: Sequence[Run]) -> dict[str, str]:
    """Teacher locations named by runs (resolved and as written) → as written."""
    out = {}
    for r in runs:
        p = r.config.get("teacher.model.path")
        if p and r.config.get("teacher.kind", "none") != "none":
            out[str(Path(str(p)).resolve())] = str(p)
            out[str(p)] = str(p)
    return out


def evaluation_only(run: Run) -> bool:
    """A directory `lmdistill eval MODEL` wrote: an evaluation, no training."""
    return not run.metrics and not run.summary


def untrained_label(run: Run) -> str:
    """``<model directory's name> (untrained)``."""
    return f"{short_value(str(run.config.get('student.path', run.path.name)))} (untrained)"


def organize(runs: Sequence[Run]) -> list[Row]:
    """Rows for the tables and curves: the teacher's rows first, then each setting × task in order."""
    named = _teacher_paths(runs)
    teacher_runs = [r for r in runs if _locations(r) & named.keys()]
    students = [r for r in runs if r not in teacher_runs]
    tasks = task_labels(runs)
    labels = variant_labels([r for r in students if not evaluation_only(r)])
    n_teachers = len({named[next(iter(_locations(r) & named.keys()))] for r in teacher_runs})

    rows: list[Row] = []
    by_task_teacher: dict[str, list[Run]] = {}
    for r in teacher_runs:
        by_task_teacher.setdefault(tasks[task_key(r)], []).append(r)
    # Teacher rows: its own run directories where given...
    for r in teacher_runs:
        where = named[next(iter(_locations(r) & named.keys()))]
        label = "teacher" if n_teachers <= 1 else f"teacher ({short_value(where)})"
        task = tasks[task_key(r)]
        row = next((x for x in rows if x.label == label and x.task == task), None)
        if row is None:
            rows.append(row := Row(label, task, [], [], teacher=True))
        row.runs.append(r)
        if r.eval:
            row.evals.append(r.eval)
    # ... else the teacher blocks the students' evaluations recorded (one per seed).
    blocks: dict[tuple[str, str], dict[Any, dict]] = {}
    for r in students:
        block = (r.eval or {}).get("teacher")
        task = tasks[task_key(r)]
        if block and task not in by_task_teacher:
            blocks.setdefault((task, str(block.get("name", "teacher"))), {}).setdefault(r.seed, block)
    names = {name for _, name in blocks}
    for (task, name), per_seed in blocks.items():
        label = "teacher" if len(names) <= 1 else f"teacher ({short_value(name.split(':', 1)[-1])})"
        rows.append(Row(label, task, [], list(per_seed.values()), teacher=True))

    groups: dict[tuple[str, str], Row] = {}
    for r in students:
        task = tasks[task_key(r)]
        if evaluation_only(r):  # a model as it was given (e.g. a pruned start), not one of the trained settings
            key, label = (f"untrained {r.config.get('student.path')}", task), untrained_label(r)
        else:
            key, label = (setting_key(r, data=True), task), labels[setting_key(r, data=False)]
        if key not in groups:
            groups[key] = Row(label, task, [], [])
            rows.append(groups[key])
        groups[key].runs.append(r)
        if r.eval:
            groups[key].evals.append(r.eval)
    # Two settings with one label on one task (e.g. differing in many keys, run under one name) stay apart.
    seen: dict[tuple[str, str], int] = {}
    for row in rows:
        n = seen[(row.label, row.task)] = seen.get((row.label, row.task), 0) + 1
        if n > 1:
            row.label = f"{row.label} #{n}"
    return rows


def tasks_of(rows: Sequence[Row]) -> list[str]:
    """The rows' tasks, in order of first appearance."""
    return list(dict.fromkeys(r.task for r in rows))
