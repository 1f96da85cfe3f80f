"""A grid of runs: ``lmdistill sweep CONFIG key=v1,v2 ... seed=1,2,3``.

Every argument ``key=value`` is a config override (as for ``lmdistill run``); a value with
top-level commas is an axis of the grid, one run per combination (the last axis varies fastest).
``seed`` stands for ``train.seed``. A list value is written in brackets: ``data.math_modules=[a,b],[c]``
is an axis of two lists. Each run gets its own directory under the sweep directory, named after
the varied keys (``lam_prime=0.5__seed=1``), and is trained by :func:`lmdistill.train.fit`, then
evaluated (``eval.json``). A run whose ``train_summary.json`` exists is finished and skipped on a
rerun; an interrupted one resumes from its newest checkpoint. ``sweep.json`` in the sweep directory
records the command, the grid and each run's directory and status.
"""

from __future__ import annotations

import gc
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from lmdistill.config import ConfigError, RunConfig
from lmdistill.evaluate.run import evaluate_run
from lmdistill.io import atomic_write_json
from lmdistill.methods import load_config
from lmdistill.rundir import EVAL, check_same_config, is_finished, run_name
from lmdistill.train import fit

ALIASES = {"seed": "train.seed"}
"""Short keys accepted on the command line."""


@dataclass
class SweepRun:
    """One point of the grid."""

    name: str
    """Directory name inside the sweep directory (from the varied keys)."""
    varied: dict[str, str]
    """Dotted key → value (as written on the command line) of this point's grid axes."""
    cfg: RunConfig
    """The resolved config (output_dir set to the run's directory)."""


def split_values(raw: str) -> list[str]:
    """Split `raw` at commas outside brackets and quotes: ``"0,0.5"`` → ``["0", "0.5"]``,
    ``"[a,b],[c]"`` → ``["[a,b]", "[c]"]``."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    if depth != 0 or quote:
        raise ConfigError(f"sweep value {raw!r}: unbalanced brackets or quotes")
    return [p.strip() for p in parts]


def parse_grid(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(fixed overrides, axes): ``["train.lr=1e-3", "seed=1,2"]`` → ``(["train.lr=1e-3"], {"train.seed": ["1", "2"]})``."""
    fixed: list[str] = []
    axes: dict[str, list[str]] = {}
    seen: set[str] = set()
    for item in args:
        if "=" not in item:
            raise ConfigError(f"sweep argument {item!r}: expected key=v1,v2,... (e.g. method.lam_prime=0,1 seed=1,2,3)")
        key, raw = item.split("=", 1)
        key = ALIASES.get(key.strip(), key.strip())
        if key in seen:
            raise ConfigError(f"sweep key {key} is given twice")
        seen.add(key)
        values = split_values(raw)
        if any(v == "" for v in values):
            raise ConfigError(f"sweep key {key}: empty value in {raw!r}")
        if len(values) > 1:
            if len(set(values)) != len(values):
                raise ConfigError(f"sweep key {key}: repeated value in {raw!r}")
            axes[key] = values
        else:
            fixed.append(f"{key}={values[0]}")
    return fixed, axes


def plan(config: str | Path | None, args: list[str], out_dir: str | Path | None = None) -> tuple[Path, list[SweepRun]]:
    """(sweep directory, runs) of a sweep; every config is built and validated before anything runs."""
    fixed, axes = parse_grid(args)
    fixed_values = dict(item.split("=", 1) for item in fixed)
    keys = [ALIASES.get(a.split("=", 1)[0].strip(), a.split("=", 1)[0].strip()) for a in args]

    def overrides_for(varied: dict[str, str]) -> list[str]:
        # Command-line order: `method.name=a,b method.max_new_tokens=12` sets the method before its option.
        return [f"{k}={varied[k] if k in varied else fixed_values[k]}" for k in keys]

    combos = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else [{}]
    base = load_config(config, overrides_for(combos[0]))
    root = Path(out_dir) if out_dir is not None else base.run_dir
    runs: list[SweepRun] = []
    names: set[str] = set()
    for varied in combos:
        name = run_name(varied)
        if name in names:
            raise ConfigError(f"two grid points get the same directory name {name!r}; use values that differ in their names")
        names.add(name)
        overrides = overrides_for(varied) + [f"name={base.name}__{name}", f"output_dir={root / name}"]
        runs.append(SweepRun(name=name, varied=varied, cfg=load_config(config, overrides)))
    return root, runs


def sweep(
    config: str | Path | None,
    args: list[str],
    *,
    out_dir: str | Path | None = None,
    evaluate: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Train (and evaluate) every grid point that is not finished; returns one status row per run."""
    root, runs = plan(config, args, out_dir)
    for run in runs:
        check_same_config(run.cfg)
    main = PartialState().is_main_process
    record = {
        "command": ["lmdistill", "sweep", str(config), *args] + (["-o", str(out_dir)] if out_dir is not None else []),
        "config": str(config),
        "args": list(args),
        "runs": [],
    }
    rows = []
    for i, run in enumerate(runs, 1):
        run_dir = run.cfg.run_dir
        if is_finished(run_dir):
            status = "skipped (finished)"
        else:
            if main:
                print(f"[{i}/{len(runs)}] {run_dir}", file=sys.stderr)
            fit(run.cfg, progress=progress)
            status = "trained"
        # A run trained now is evaluated again (an eval.json left from before would be stale).
        if evaluate and main and (status == "trained" or not (run_dir / EVAL).exists()):
            evaluate_run(run_dir)
            status += ", evaluated"
        rows.append({"name": run.name, "run_dir": str(run_dir), "varied": run.varied, "status": status})
        if main:
            print(f"[{i}/{len(runs)}] {run.name}: {status}", file=sys.stderr)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if main:
        record["runs"] = rows
        atomic_write_json(root / "sweep.json", record)
    return rows
