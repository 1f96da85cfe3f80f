"""``lmdistill report``: read run directories, write report.md and its PNG figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmdistill.io import atomic_write_bytes, atomic_write_text
from lmdistill.report.groups import Row, organize, tasks_of
from lmdistill.report.plots import accuracy_key, plot_curves
from lmdistill.report.runs import ReportError, find_runs, load_run
from lmdistill.report.tables import (
    bucket_table,
    heldout_table,
    kl_table,
    mean_std,
    results_table,
    runs_table,
    speed_table,
)


def _teacher_mean(key: str) -> Callable[[Row], float | None]:
    return lambda r: mean_std([e.get(key) for e in r.evals])[0]


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    markdown: Path
    figures: list[Path]
    rows: list[Row]


def write_report(paths: Sequence[str | Path], out_dir: str | Path, *, command: str | None = None) -> Report:
    """Read the run directories (or sweep directories) in `paths`; write report.md and PNG figures to `out_dir`."""
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
        ("accuracy.png", accuracy_key, "held-out accuracy", None),
    ):
        png = plot_curves(rows, key_of, title, teacher)
        if png is None:
            md += [f"_No training curve for {title} (no metrics.jsonl with it)._", ""]
            continue
        atomic_write_bytes(out / name, png)
        figures.append(out / name)
        md += [f"![{title}]({name})", ""]

    md += ["## Results", "", results_table(rows), ""]
    for task in tasks_of(rows):
        md += [f"## By reference length — {task}", "", bucket_table(rows, task), ""]
    for task in tasks_of(rows):
        md += [f"## Divergence to the teacher — {task}", "",
               "Forward KL(teacher ‖ student) and reverse KL(student ‖ teacher), nats, teacher-forced on the "
               "held-out reference responses: at each row's first response token, and averaged over all "
               "response tokens.", "", kl_table(rows, task), ""]
    for task in tasks_of(rows):
        md += [f"## Held-out token metrics — {task}", "", heldout_table(rows, task), ""]
    md += ["## Size and generation speed", "",
           "Tokens per second of batched generation on the same prompts, student and teacher measured in the "
           "same `lmdistill eval` call.", "", speed_table(rows), ""]
    md += ["## Runs", "", runs_table(rows), ""]
    markdown = out / "report.md"
    atomic_write_text(markdown, "\n".join(md))
    return Report(markdown, figures, rows)
