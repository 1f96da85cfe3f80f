"""The report's figures: held-out curves against cumulative training FLOPs, one panel per task.

Curves are the mean over a group's seeds with a ±1 std band, aligned by step. matplotlib is
imported when a figure is drawn, so that reading and tables (and the ``lmdistill`` command line,
which imports the report) do not pay for it.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Callable, Sequence

from lmdistill.report.groups import Row, tasks_of
from lmdistill.report.runs import Run

PERCENT_METRICS = frozenset({"eval_accuracy", "eval_token_acc"})
"""Logged fractions plotted as percentages."""


def curve(runs: Sequence[Run], key: str, x_key: str = "flops") -> tuple[list[float], list[float], list[float]]:
    """(x, mean y, std y) over the runs' logged lines that have `key`, aligned by step (steps every run logged)."""
    per_run = [{row["step"]: row for row in run.metrics
                if row.get(key) is not None and row.get(x_key) is not None and "step" in row} for run in runs]
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


def accuracy_key(runs: Sequence[Run]) -> tuple[str, str] | None:
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

    tasks = [t for t in tasks_of(rows) if any(r.runs and r.runs[0].metrics for r in rows if r.task == t)]
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
