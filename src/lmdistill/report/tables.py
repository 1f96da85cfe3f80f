"""The report's Markdown tables: results, by reference length, KL to the teacher, held-out numbers, speed, runs.

Numbers are mean ± sample standard deviation over a row's seeds (no ± with a single value).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from lmdistill.report.groups import Row, tasks_of

BUCKET_TITLES = ("≤ median", "median–mean", "> mean")


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


def _labels(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.label for r in rows))


def _row(rows: Sequence[Row], label: str, task: str) -> Row | None:
    return next((r for r in rows if r.label == label and r.task == task), None)


def _seeds(row: Row | None) -> str:
    if row is None:
        return "–"
    return str(len(row.runs) if row.runs else len(row.evals))


def results_table(rows: Sequence[Row]) -> str:
    """Method × task: ROUGE-L / EM / answer accuracy (%), mean ± std over seeds, the teacher's row on top."""
    tasks = tasks_of(rows)
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
