"""Reports from run directories: Markdown tables and PNG figures (``lmdistill report RUN_DIR... -o DIR``).

A report reads only what runs leave on disk: ``config.yaml`` (the resolved config),
``metrics.jsonl`` (training log with cumulative ``flops`` and the held-out ``eval_*`` numbers),
``eval.json`` (``lmdistill eval``) and ``train_summary.json``. So any run can be compared with any
other, wherever it was trained.

How runs are organised:

- A **group** is the runs whose configs are equal except for the seed (``train.seed``), name,
  directory, logging/checkpoint cadence and the ``eval`` section: the seeds of one setting.
  Numbers are mean ± sample standard deviation over a group's seeds; curves are the mean with a
  ±1 std band, aligned by step.
- The **task** of a run is its ``data`` section: ``math`` for the math generator, else the train
  file's name; tasks that would share a name get their differing data keys appended.
- A group's **label** is its method, plus the keys in which it differs from other groups of the same
  method (``feedback-kl lam_prime=0.5``); with more than four such keys, its run name instead.
- The **teacher's row** (on top of each table): a run directory given to the report whose model is
  the teacher named in other runs' configs (``teacher.model.path``); otherwise the teacher's numbers
  that ``lmdistill eval`` recorded in the students' eval.json (one per seed).
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

IGNORED_KEYS = frozenset({
    "name", "output_dir", "train.seed", "train.resume", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_checkpoints",
})
"""Config keys that do not define a setting (runs differing only in these are seeds of one group)."""
IGNORED_PREFIXES = ("eval.",)
MAX_LABEL_KEYS = 4
BUCKET_TITLES = ("≤ median", "median–mean", "> mean")
PERCENT_METRICS = frozenset({"eval_accuracy", "eval_token_acc"})
"""Logged fractions plotted as percentages."""


class ReportError(ValueError):
    """A run directory is missing or unreadable; the message names the file (and line)."""


# --------------------------------------------------------------------------- reading run directories


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


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl (empty when absent); a bad line is an error naming file:line."""
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{i}: expected a JSON object")
        rows.append(row)
    return rows


def load_run(path: str | Path) -> Run:
    """Read one run directory (config.yaml required; the other files when present)."""
    path = Path(path)
    cfg_path = path / "config.yaml"
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except FileNotFoundError:
        raise ReportError(f"{path}: not a run directory (no config.yaml)") from None
    except yaml.YAMLError as e:
        raise ReportError(f"{cfg_path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ReportError(f"{cfg_path}: the top level must be a mapping")
    return Run(path=path, config=flatten(config), metrics=read_metrics(path / "metrics.jsonl"),
               eval=_read_json(path / "eval.json"), summary=_read_json(path / "train_summary.json"))


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories among `paths`: each path itself, or (a sweep directory) its subdirectories that are runs."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if (c / "config.yaml").is_file()) if p.is_dir() else []
        if not children:
            raise ReportError(f"{p}: not a run directory (no config.yaml) and holds none")
        out.extend(children)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


# --------------------------------------------------------------------------- groups, tasks, labels


def setting_key(run: Run, *, data: bool) -> str:
    """JSON of the config keys that define a setting; with `data=False`, without the data section."""
    items = {
        k: v for k, v in run.config.items()
        if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES) and (data or not k.startswith("data."))
    }
    return json.dumps(sorted(items.items()), default=str)


def task_key(run: Run) -> str:
    return json.dumps(sorted((k, v) for k, v in run.config.items() if k.startswith("data.")), default=str)


def _varying(runs: Sequence[Run], keys: Callable[[str], bool]) -> list[str]:
    """Config keys (passing `keys`) whose values differ among `runs`, in config order."""
    order: dict[str, None] = {}
    for r in runs:
        for k in r.config:
            if keys(k):
                order.setdefault(k, None)
    return [k for k in order if len({json.dumps(r.config.get(k), default=str) for r in runs}) > 1]


def _short(value: Any) -> str:
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
        extra = _varying(same, lambda k: k.startswith("data.") and k not in ("data.train_path", "data.eval_path"))
        out[tk] = name + "".join(f" {k.split('.', 1)[1]}={_short(firsts[tk].config.get(k))}" for k in extra)
    return out


def _strip_seed(name: str) -> str:
    return re.sub(r"(^|__)seed=[^_]*", "", name).strip("_") or name


def variant_labels(runs: Sequence[Run]) -> dict[str, str]:
    """Setting key without data → label: method + the keys in which it differs from same-method settings."""
    from lmdistill.sweep import _short_keys

    firsts: dict[str, Run] = {}
    for r in runs:
        firsts.setdefault(setting_key(r, data=False), r)
    out = {}
    for vk, r in firsts.items():
        same = [x for x in firsts.values() if x.method == r.method]
        keys = _varying(same, lambda k: not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS
                        and not k.startswith("data.") and k != "method.name")
        if len(keys) > MAX_LABEL_KEYS:
            out[vk] = _strip_seed(str(r.config.get("name", r.path.name)))
            continue
        short = _short_keys(keys)
        parts = [f"{short[k]}={_short(r.config.get(k))}" for k in keys]
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


def organize(runs: Sequence[Run]) -> list[Row]:
    """Rows for the tables and curves: the teacher's rows first, then each setting × task in order."""
    named = _teacher_paths(runs)
    teacher_runs = [r for r in runs if _locations(r) & named.keys()]
    students = [r for r in runs if r not in teacher_runs]
    tasks = task_labels(runs)
    labels = variant_labels(students)
    n_teachers = len({named[next(iter(_locations(r) & named.keys()))] for r in teacher_runs})

    rows: list[Row] = []
    by_task_teacher: dict[str, list[Run]] = {}
    for r in teacher_runs:
        by_task_teacher.setdefault(tasks[task_key(r)], []).append(r)
    # Teacher rows: its own run directories where given...
    for r in teacher_runs:
        where = named[next(iter(_locations(r) & named.keys()))]
        label = "teacher" if n_teachers <= 1 else f"teacher ({_short(where)})"
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
        label = "teacher" if len(names) <= 1 else f"teacher ({_short(name.split(':', 1)[-1])})"
        rows.append(Row(label, task, [], list(per_seed.values()), teacher=True))

    groups: dict[tuple[str, str], Row] = {}
    for r in students:
        task = tasks[task_key(r)]
        key = (setting_key(r, data=True), task)
        if key not in groups:
            groups[key] = Row(labels[setting_key(r, data=False)], task, [], [])
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


# --------------------------------------------------------------------------- numbers


def get(d: dict | None, dotted: str) -> Any:
    """`d["a"]["b"]` for ``"a.b"``; list items by index (``"buckets.0.rouge_l"``); None when absent."""
    cur: Any = d
    for part in dotted.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
    return cur


def mean_std(values: Sequence[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None with fewer than 2 values, count) over the finite numbers in `values`."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def fmt(values: Sequence[Any], *, scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of `values` × `scale` (``–`` when there is none; no ± with a single value)."""
    m, s, n = mean_std(values)
    if m is None:
        return "–"
    text = f"{m * scale:.{digits}f}"
    return text + (f" ± {s * scale:.{digits}f}" if s is not None else "")


def fmt_count(x: float | None) -> str:
    """1.23e+12-style number, or ``–``."""
    return "–" if x is None else f"{x:.3g}"


def _millions(values: Sequence[Any]) -> str:
    """Mean parameter count in millions (the same for every seed of a setting)."""
    m = mean_std(values)[0]
    return "–" if m is None else f"{m / 1e6:.3f}M"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tasks(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.task for r in rows))


def _labels(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.label for r in rows))


def _row(rows: Sequence[Row], label: str, task: str) -> Row | None:
    return next((r for r in rows if r.label == label and r.task == task), None)


def _seeds(row: Row | None) -> str:
    if row is None:
        return "–"
    return str(len(row.runs) if row.runs else len(row.evals))


# --------------------------------------------------------------------------- tables


def results_table(rows: Sequence[Row]) -> str:
    """Method × task: ROUGE-L / EM / answer accuracy (%), mean ± std over seeds, the teacher's row on top."""
    tasks = _tasks(rows)
    header = ["method", "params"]
    for t in tasks:
        header += [f"{t} ROUGE-L", f"{t} EM", f"{t} accuracy", f"{t} seeds"]
    out = []
    for label in _labels(rows):
        evals = [e for r in rows if r.label == label for e in r.evals]
        line = [label, _millions([e.get("params") for e in evals])]
        for t in tasks:
            row = _row(rows, label, t)
            evals = row.evals if row else []
            line += [fmt([e.get("rouge_l") for e in evals], scale=100), fmt([e.get("exact_match") for e in evals], scale=100),
                     fmt([e.get("accuracy") for e in evals], scale=100), _seeds(row)]
        out.append(line)
    return _table(header, out)


def bucket_table(rows: Sequence[Row], task: str) -> str:
    """ROUGE-L and EM (%) by reference length: ≤ median, median–mean, > mean."""
    mine = [r for r in rows if r.task == task]
    with_buckets = [e for r in mine for e in r.evals if e.get("buckets")]
    ref = next((e for e in with_buckets if e.get("length_median") is not None), with_buckets[0] if with_buckets else None)
    if ref is None:
        return "_No generation results (eval.json with buckets) for this task._"
    unit = ref.get("length_unit", "chars")
    counts = [str(get(ref, f"buckets.{i}.n")) for i in range(3)]
    header = ["method"]
    for i, title in enumerate(BUCKET_TITLES):
        header += [f"{title} ROUGE-L (n={counts[i]})", f"{title} EM"]
    out = []
    for r in mine:
        line = [r.label]
        for i in range(3):
            line += [fmt([get(e, f"buckets.{i}.rouge_l") for e in r.evals], scale=100),
                     fmt([get(e, f"buckets.{i}.exact_match") for e in r.evals], scale=100)]
        out.append(line)
    med, avg = ref.get("length_median"), ref.get("length_mean")
    note = (f"Reference length in {unit}: median {med:g}, mean {avg:g}." if isinstance(med, (int, float))
            and isinstance(avg, (int, float)) else f"Reference length in {unit}.")
    return note + "\n\n" + _table(header, out)


def kl_table(rows: Sequence[Row], task: str) -> str:
    """Forward KL(teacher‖student) and reverse KL(student‖teacher) on held-out references (nats/token)."""
    mine = [r for r in rows if r.task == task and not r.teacher]
    if not any(get(e, "teacher_kl") for r in mine for e in r.evals):
        return "_No KL to a teacher recorded (evaluate with a teacher configured: teacher.kind=local ...)._"
    header = ["method", "KL first token", "reverse KL first token", "KL all tokens", "reverse KL all tokens"]
    out = [[r.label] + [fmt([get(e, f"teacher_kl.{k}") for e in r.evals], digits=4)
                        for k in ("fkl_first", "rkl_first", "fkl_all", "rkl_all")] for r in mine]
    return _table(header, out)


def heldout_table(rows: Sequence[Row], task: str) -> str:
    """Teacher-forced held-out numbers, generation length and compute."""
    header = ["method", "held-out CE (nats/token)", "next-token accuracy (%)", "ECE (%)", "mean generation length (tokens)",
              "training FLOPs"]
    out = []
    for r in (x for x in rows if x.task == task):
        flops = mean_std([x.final_flops for x in r.runs])[0]
        out.append([r.label, fmt([e.get("heldout_ce") for e in r.evals], digits=4),
                    fmt([e.get("token_acc") for e in r.evals], scale=100), fmt([e.get("ece") for e in r.evals], scale=100),
                    fmt([e.get("mean_gen_length") for e in r.evals]), fmt_count(flops)])
    return _table(header, out)


def speed_table(rows: Sequence[Row]) -> str:
    """Parameters and generation speed of each student next to its teacher's, measured in the same evaluation."""
    header = ["method", "task", "params", "generation tokens/s", "teacher params", "teacher tokens/s", "speed vs teacher"]
    out = []
    for r in rows:
        if r.teacher:
            continue
        s = mean_std([e.get("tokens_per_second") for e in r.evals])[0]
        t = mean_std([get(e, "teacher.tokens_per_second") for e in r.evals])[0]
        out.append([r.label, r.task, _millions([e.get("params") for e in r.evals]),
                    fmt([e.get("tokens_per_second") for e in r.evals], digits=0),
                    _millions([get(e, "teacher.params") for e in r.evals]),
                    fmt([get(e, "teacher.tokens_per_second") for e in r.evals], digits=0),
                    f"{s / t:.2f}x" if s and t else "–"])
    return _table(header, out)


def runs_table(rows: Sequence[Row]) -> str:
    """Every run directory read, with its seed, steps and compute."""
    out = []
    for r in rows:
        for run in r.runs:
            steps = run.metrics[-1].get("step") if run.metrics else None
            out.append([f"`{run.path}`", r.label, r.task, str(run.seed), str(steps if steps is not None else "–"),
                        fmt_count(run.final_flops), "yes" if run.eval else "no"])
    return _table(["run directory", "label", "task", "seed", "steps", "FLOPs", "eval.json"], out)


# --------------------------------------------------------------------------- curves


def curve(runs: Sequence[Run], key: str, x_key: str = "flops") -> tuple[list[float], list[float], list[float]]:
    """(x, mean y, std y) over the runs' logged lines that have `key`, aligned by step (steps every run logged)."""
    per_run = [{row["step"]: row for row in run.metrics if key in row and x_key in row and "step" in row} for run in runs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return [], [], []
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    xs, ys, ss = [], [], []
    for s in steps:
        y = [float(p[s][key]) for p in per_run]
        finite = [v for v in y if math.isfinite(v)]
        if not finite:
            continue
        xs.append(statistics.fmean(float(p[s][x_key]) for p in per_run))
        ys.append(statistics.fmean(finite))
        ss.append(statistics.stdev(finite) if len(finite) > 1 else 0.0)
    return xs, ys, ss


def _accuracy_key(runs: Sequence[Run]) -> tuple[str, str] | None:
    if runs and all(any("eval_accuracy" in m for m in r.metrics) for r in runs):
        return "eval_accuracy", "answer accuracy, greedy (%)"
    if runs and all(any("eval_token_acc" in m for m in r.metrics) for r in runs):
        return "eval_token_acc", "next-token accuracy (%)"
    return None


def plot_curves(rows: Sequence[Row], key_of: Callable[[list[Run]], tuple[str, str] | None], title: str,
                teacher_value: Callable[[Row], float | None] | None = None) -> bytes | None:
    """PNG bytes: one panel per task, one curve per group (mean, ±1 std band) against cumulative FLOPs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [t for t in _tasks(rows) if any(r.runs and r.runs[0].metrics for r in rows if r.task == t)]
    if not tasks:
        return None
    fig = Figure(figsize=(6.5 * len(tasks), 4.5))
    FigureCanvasAgg(fig)
    drawn = False
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        mine = [r for r in rows if r.task == task and not r.teacher and r.runs]
        key = key_of([run for r in mine for run in r.runs])
        if key is None:
            ax.set_visible(False)
            continue
        metric, ylabel = key
        spans = []
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        # Past the 10 default colours, line styles keep every curve distinguishable.
        styles = ["-", "--", ":", "-."]
        for j, r in enumerate(mine):
            xs, ys, ss = curve(r.runs, metric)
            if not xs:
                continue
            ys, ss = [y * scale for y in ys], [x * scale for x in ss]
            n = len(r.runs)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, linestyle=styles[(j // 10) % len(styles)],
                              label=f"{r.label} ({n} seed{'s' if n > 1 else ''})")
            if n > 1:
                ax.fill_between(xs, [y - s for y, s in zip(ys, ss)], [y + s for y, s in zip(ys, ss)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
            spans += xs
            drawn = True
        if teacher_value is not None:
            for r in rows:
                v = teacher_value(r) if r.teacher and r.task == task else None
                if v is not None:
                    ax.axhline(v, color="black", linestyle="--", linewidth=1, label=f"{r.label} (its held-out CE)")
        if spans and min(spans) > 0 and max(spans) / min(spans) > 10:
            ax.set_xscale("log")
        ax.set_xlabel("cumulative training FLOPs (student updates + teacher + sampling)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} — {task}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if not drawn:
        return None
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _teacher_mean(key: str) -> Callable[[Row], float | None]:
    return lambda r: mean_std([e.get(key) for e in r.evals])[0]


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    markdown: Path
    figures: list[Path]
    rows: list[Row]


def write_report(paths: Sequence[str | Path], out_dir: str | Path, *, command: str | None = None) -> Report:
    """Read the run directories (or sweep directories) in `paths`; write report.md and PNG figures to `out_dir`."""
    from lmdistill.io import atomic_write_bytes, atomic_write_text

    run_dirs = find_runs(paths)
    if not run_dirs:
        raise ReportError("no run directories given")
    runs, empty = [], []
    for run in map(load_run, run_dirs):
        if run.metrics or run.eval or run.summary:
            runs.append(run)
        else:
            empty.append(str(run.path))
    if not runs:
        raise ReportError(f"no results yet in {', '.join(empty)} (no metrics.jsonl, eval.json or train_summary.json)")
    rows = organize(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    figures: list[Path] = []
    md = ["# lmdistill report", ""]
    if command:
        md += [f"Written by `{command}`.", ""]
    md += [
        f"{len(runs)} run directories. Numbers are mean ± standard deviation over seeds (no ± with one seed); "
        "ROUGE-L, exact match (EM) and accuracy are percentages of held-out prompts; the first decoding in "
        "`eval.decoding` (usually greedy).",
        "",
    ]
    if empty:
        md += [f"Left out, with no results yet (not started or stopped before its first log): {', '.join(empty)}.", ""]
    md += [
        "## Held-out loss and accuracy against training compute",
        "",
        "Measured on the held-out data during training, whatever the method's own objective: cross-entropy "
        "of the reference responses, and answer accuracy of greedy answers (`eval.n_generate_train`) or, "
        "where that was not logged, next-token accuracy. Curves: mean over seeds, band ±1 std.",
        "",
    ]
    for name, key_of, title, teacher in (
        ("heldout_ce.png", lambda rs: ("eval_ce", "held-out cross-entropy (nats/token)")
         if any("eval_ce" in m for r in rs for m in r.metrics) else None, "held-out loss", _teacher_mean("heldout_ce")),
        ("accuracy.png", _accuracy_key, "held-out accuracy", None),
    ):
        png = plot_curves(rows, key_of, title, teacher)
        if png is None:
            md += [f"_No training curve for {title} (no metrics.jsonl with it)._", ""]
            continue
        atomic_write_bytes(out / name, png)
        figures.append(out / name)
        md += [f"![{title}]({name})", ""]

    md += ["## Results", "", results_table(rows), ""]
    for task in _tasks(rows):
        md += [f"## By reference length — {task}", "", bucket_table(rows, task), ""]
    for task in _tasks(rows):
        md += [f"## Divergence to the teacher — {task}", "",
               "Forward KL(teacher ‖ student) and reverse KL(student ‖ teacher), nats, teacher-forced on the "
               "held-out reference responses: at each row's first response token, and averaged over all "
               "response tokens.", "", kl_table(rows, task), ""]
    for task in _tasks(rows):
        md += [f"## Held-out token metrics — {task}", "", heldout_table(rows, task), ""]
    md += ["## Size and generation speed", "",
           "Tokens per second of batched generation on the same prompts, student and teacher measured in the "
           "same `lmdistill eval` call.", "", speed_table(rows), ""]
    md += ["## Runs", "", runs_table(rows), ""]
    markdown = out / "report.md"
    atomic_write_text(markdown, "\n".join(md))
    return Report(markdown, figures, rows)
