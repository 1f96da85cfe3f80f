"""The offline demo: math data → a teacher trained from scratch → smaller students → a table.

Everything is built here: DeepMind's math generator writes the data, a character-level
tokenizer reads it, and both models are small Llamas trained on this machine. No network.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmdistill.config import RunConfig, build
from lmdistill.evaluate import evaluate_run
from lmdistill.train import fit

DATA = {"source": "math", "n_train": 20000, "n_eval": 400, "max_length": 96, "math_difficulty": 0.2}
EVAL = {"batch_size": 100, "max_eval_rows": 400, "n_generate": 200, "max_new_tokens": 16}
TEACHER = {"tokenizer": "char", "n_layer": 4, "n_embd": 192, "n_head": 6, "max_position": 128}
STUDENT = {"tokenizer": "char", "n_layer": 2, "n_embd": 64, "n_head": 4, "max_position": 128}
TRAIN = {"batch_size": 64, "lr": 3e-3, "warmup_steps": 30, "log_every": 10, "eval_every": 100}


def quickstart_configs(out_dir: str | Path, scale: float = 1.0) -> dict[str, RunConfig]:
    """The demo's runs by label: the teacher first, then the students (same data, same budget)."""
    out = Path(out_dir)

    def run(name: str, model: dict, steps: int, method: dict, teacher: dict | None = None) -> RunConfig:
        return build(
            RunConfig,
            {
                "name": name,
                "output_dir": str(out / name),
                "student": model,
                "teacher": teacher or {},
                "data": DATA,
                "train": {**TRAIN, "steps": max(2, int(steps * scale))},
                "eval": EVAL,
                "method": method,
            },
        )

    return {
        "teacher": run("teacher", TEACHER, 600, {"name": "sft"}),
        "student sft": run("student_sft", STUDENT, 600, {"name": "sft"}),
    }


def quickstart(out_dir: str | Path = "runs/quickstart", scale: float = 1.0) -> list[dict]:
    """Train and evaluate the demo's runs and print the comparison table; returns its rows."""
    rows = []
    for label, cfg in quickstart_configs(out_dir, scale).items():
        t0 = time.perf_counter()
        result = fit(cfg)
        ev = evaluate_run(result.run_dir)
        rows.append(
            {
                "model": label,
                "params": ev["params"],
                "heldout_ce": ev["heldout_ce"],
                "accuracy": ev.get("accuracy", float("nan")),
                "train_flops": result.metrics.get("flops", 0.0),
                "seconds": time.perf_counter() - t0,
            }
        )
    print()
    print(format_table(rows))
    print(f"\nrun directories: {Path(out_dir).resolve()}")
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the demo's results."""
    head = "| model | params | held-out CE (nats/token) | exact-match accuracy | train FLOPs | wall time (s) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['heldout_ce']:.4f} | {r['accuracy']:.1%} | "
            f"{r['train_flops']:.2e} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)
