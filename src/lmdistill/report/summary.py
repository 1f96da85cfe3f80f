"""``summary.json``: an experiment's numbers in one machine-readable file (``lmdistill report ... --summary``).

::

    {"teacher": {metric: value}, "student_init": {metric: value},
     "runs": [{"run_dir", "method", "params": {varied key: value}, "seed", "steps", metric: value,
               "flops", "flops_train", "flops_other"}],
     "groups": [{"label", "method", "params", "task", "seeds", "n", metric: {"mean", "ci95", "std", "n"}}]}

- **metrics** are the held-out numbers of each directory's ``eval.json``, named as there: its top-level
  numbers (``heldout_ce``, ``token_acc``, ``ece``, ``rouge_l``, ``exact_match``, ``accuracy``,
  ``mean_gen_length``, ``tokens_per_second``, ...; those of the first decoding) and the numbers of its
  ``teacher_kl`` block (``fkl_first``, ``rkl_first``, ``fkl_all``, ``rkl_all``, ...). The parameter
  counts are ``n_params`` and ``n_params_non_embedding`` (``params`` is the run's settings).
- **teacher** and **student_init** come from evaluation-only run directories (``lmdistill eval MODEL
  CONFIG -o DIR``) or any run directory with an eval.json; null when not given.
- **params** of a run: the config keys that differ among the runs (the swept ones: ``lam_prime``,
  ``steps``, ...), under the short names the sweep gives its directories; not the seed.
- **flops** is the run's final cumulative count from metrics.jsonl (``flops_train`` + ``flops_other``).
- **groups**: the seeds of one setting (:func:`lmdistill.report.groups.organize`), each metric's mean
  and the half-width of its 95 % Student-t confidence interval over seeds (``ci95``; null with one seed).

Reads run directories only through :mod:`lmdistill.rundir` (via :func:`~lmdistill.report.runs.load_run`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmdistill.io import atomic_write_text
from lmdistill.report.groups import IGNORED_KEYS, IGNORED_PREFIXES, organize, varying
from lmdistill.report.runs import ReportError, Run, find_runs, load_run
from lmdistill.rundir import EVAL, short_keys

SUMMARY_JSON = "summary.json"
RENAMED = {"params": "n_params", "params_non_embedding": "n_params_non_embedding"}
"""eval.json keys renamed in the summary (a run's ``params`` are its settings)."""
FLOP_KEYS = ("flops", "flops_train", "flops_other")

# Two-sided 95 % quantiles of Student's t, df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table to 30, Cornish-Fisher above)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_ci(values: Sequence[Any]) -> dict[str, float | int | None]:
    """``{"mean", "ci95", "std", "n"}`` over the finite numbers in `values`: the sample mean, the half-width of
    its 95 % t-interval and the sample std (both None with fewer than two values)."""
    xs = [float(v) for v in values if _number(v)]
    if not xs:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    if len(xs) == 1:
        return {"mean": xs[0], "ci95": None, "std": None, "n": 1}
    std = statistics.stdev(xs)
    return {"mean": statistics.fmean(xs), "ci95": t_quantile_975(len(xs) - 1) * std / math.sqrt(len(xs)),
            "std": std, "n": len(xs)}


def eval_metrics(ev: dict) -> dict[str, float]:
    """The held-out numbers of one eval.json, named as there (parameter counts as ``n_params*``)."""
    out: dict[str, float] = {}
    for k, v in ev.items():
        if _number(v):
            out[RENAMED.get(k, k)] = v
    # An eval.json without top-level generation numbers: those of its first decoding.
    first = next(iter((ev.get("decoding") or {}).values()), None)
    if isinstance(first, dict):
        for k, v in first.items():
            if _number(v) and k not in out and k not in ("n", "seconds"):
                out[k] = v
    for k, v in (ev.get("teacher_kl") or {}).items():
        if _number(v):
            out.setdefault(k, v)
    return out


def _evaluated(run: Run) -> dict:
    if run.eval is None:
        raise ReportError(f"{run.path}: no {EVAL}; evaluate it first (lmdistill eval {run.path})")
    return run.eval


def _last(run: Run, key: str) -> float | None:
    for row in reversed(run.metrics):
        if key in row:
            return float(row[key])
    return None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _varied_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ among `runs` (not the seed, name, cadence, eval or method name)."""
    return varying(runs, lambda k: k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES) and k != "method.name")


def _block(path: str | Path | None) -> dict[str, float] | None:
    return None if path is None else eval_metrics(_evaluated(load_run(path)))


def summarize(paths: Sequence[str | Path], *, teacher: str | Path | None = None,
              student_init: str | Path | None = None) -> dict:
    """The summary of the run directories (or sweep directories) in `paths`; `teacher` and `student_init`
    are run directories holding an eval.json. Every run must have been evaluated (eval.json)."""
    exclude = {Path(p).resolve() for p in (teacher, student_init) if p is not None}
    runs = [load_run(p) for p in find_runs(paths) if p.resolve() not in exclude]
    if not runs:
        raise ReportError("no run directories to summarise")
    for r in runs:
        _evaluated(r)
    keys = _varied_keys(runs)
    short = short_keys(keys)

    def params(run: Run) -> dict[str, Any]:
        return {short[k]: _jsonable(run.config.get(k)) for k in keys}

    rows = []
    for r in runs:
        steps = _last(r, "step")
        rows.append({"run_dir": str(r.path), "method": r.method, "params": params(r), "seed": r.seed,
                     "steps": None if steps is None else int(steps), **eval_metrics(_evaluated(r)),
                     **{k: _last(r, k) for k in FLOP_KEYS}})
    groups = []
    for g in organize(runs):
        if g.teacher:
            continue
        per_run = [next(x for x in rows if x["run_dir"] == str(run.path)) for run in g.runs]
        names = list(dict.fromkeys(k for x in per_run for k, v in x.items() if _number(v) and k not in ("seed",)))
        groups.append({"label": g.label, "method": g.runs[0].method, "params": params(g.runs[0]), "task": g.task,
                       "seeds": [x["seed"] for x in per_run], "n": len(per_run),
                       **{k: mean_ci([x.get(k) for x in per_run]) for k in names}})
    return {"teacher": _block(teacher), "student_init": _block(student_init), "runs": rows, "groups": groups}


def write_summary(paths: Sequence[str | Path], out_dir: str | Path, *, teacher: str | Path | None = None,
                  student_init: str | Path | None = None) -> Path:
    """Write `out_dir`/summary.json (:func:`summarize`) and return its path."""
    summary = summarize(paths, teacher=teacher, student_init=student_init)
    out = Path(out_dir) / SUMMARY_JSON
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(summary, indent=2) + "\n")
    return out
