"""The offline demo: math data → a teacher trained from scratch → smaller students → a table.

Everything is built here: DeepMind's math generator writes the data, a character-level
tokenizer reads it, and both models are small Llamas trained on this machine. No network.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmdistill import rundir
from lmdistill.config import RunConfig, build
from lmdistill.evaluate.run import evaluate_run
from lmdistill.methods import METHOD_CONFIGS
from lmdistill.report import write_report
from lmdistill.train import fit

DATA = {"source": "math", "n_train": 20000, "n_eval": 400, "max_length": 96, "math_difficulty": 0.2}
EVAL = {"batch_size": 100, "max_eval_rows": 400, "n_generate": 200, "max_new_tokens": 16, "compare_teacher": False}
TEACHER = {"tokenizer": "char", "n_layer": 4, "n_embd": 192, "n_head": 6, "max_position": 128}
STUDENT = {"tokenizer": "char", "n_layer": 2, "n_embd": 64, "n_head": 4, "max_position": 128}
ON_POLICY_TOKENS = 12
"""Length limit of on-policy samples and teacher outputs: math answers are short (≤ 10 characters here)."""
TRAIN = {"batch_size": 32, "lr": 3e-3, "warmup_steps": 30, "log_every": 10, "eval_every": 100}
TEACHER_STEPS, STUDENT_STEPS = 600, 200
"""The students train for fewer steps than the teacher (the same number each) so that the demo with its
on-policy students stays within 10 minutes on a 2-core CPU."""


DEFAULT_METHODS = ("sft", "kd", "feedback-kl", "dpkd")
STUDENT_METHODS = {
    "sft": {"name": "sft"},
    "seqkd": {"name": "seqkd", "max_new_tokens": ON_POLICY_TOKENS},
    "kd": {"name": "kd", "divergence": "fkl"},
    "kd-rkl": {"name": "kd", "divergence": "rkl"},
    "akl": {"name": "akl"},
    "gkd": {"name": "gkd", "max_new_tokens": ON_POLICY_TOKENS},
    "distillm": {"name": "distillm", "max_new_tokens": ON_POLICY_TOKENS},
    "minillm": {"name": "minillm", "max_new_tokens": ON_POLICY_TOKENS},
    "feedback-kl": {"name": "feedback-kl", "max_new_tokens": ON_POLICY_TOKENS},
    "dpkd": {"name": "dpkd", "max_new_tokens": ON_POLICY_TOKENS},
    "hidden": {"name": "hidden"},
}
"""Students the demo can train (`--methods`); step-by-step and context need elicited rationales/contexts."""


def quickstart_configs(out_dir: str | Path, scale: float = 1.0,
                       methods: tuple[str, ...] = DEFAULT_METHODS) -> dict[str, RunConfig]:
    """The demo's runs by label: the teacher first, then one student per method (same data, same steps).

    Every student names the teacher, so its evaluation measures KL to it (sft ignores it in training).
    """
    out = Path(out_dir)
    unknown = [m for m in methods if m not in STUDENT_METHODS]
    if unknown:
        raise ValueError(f"quickstart: unknown method(s) {', '.join(unknown)}; known: {', '.join(STUDENT_METHODS)}")

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
            method_configs=METHOD_CONFIGS,
        )

    teacher = {"kind": "local", "model": {"path": str(out / "teacher" / "model")}}
    runs = {"teacher": run("teacher", TEACHER, TEACHER_STEPS, {"name": "sft"})}
    for m in methods:
        runs[f"student {m}"] = run("student_" + m.replace("-", "_"), STUDENT, STUDENT_STEPS, STUDENT_METHODS[m], teacher)
    return runs


def quickstart(out_dir: str | Path = "runs/quickstart", scale: float = 1.0,
               methods: tuple[str, ...] = DEFAULT_METHODS) -> list[dict]:
    """Train and evaluate the demo's runs and print the comparison table; returns its rows."""
    rows = []
    configs = quickstart_configs(out_dir, scale, methods)
    for cfg in configs.values():
        rundir.check_same_config(cfg)  # before any training: a stale directory stops the demo at once
    for label, cfg in configs.items():
        t0 = time.perf_counter()
        if rundir.is_finished(cfg.run_dir):  # a rerun (e.g. with more --methods) reuses finished runs
            print(f"{label}: finished before, reusing {cfg.run_dir}")
            final = rundir.read_summary(cfg.run_dir)["final"]
            ev = rundir.read_eval(cfg.run_dir) or evaluate_run(cfg.run_dir)
        else:
            final = fit(cfg).metrics
            ev = evaluate_run(cfg.run_dir)
        rows.append(
            {
                "model": label,
                "params": ev["params"],
                "heldout_ce": ev["heldout_ce"],
                "accuracy": ev.get("accuracy", float("nan")),
                "teacher_kl": ev.get("teacher_kl", {}).get("fkl_all", float("nan")),
                "train_flops": final.get("flops", 0.0),
                "seconds": time.perf_counter() - t0,
            }
        )
    print()
    print(format_table(rows))
    print(f"\nrun directories: {Path(out_dir).resolve()}")
    report = write_report([c.run_dir for c in configs.values()], Path(out_dir) / "report",
                          command=f"lmdistill report {Path(out_dir)} -o {Path(out_dir) / 'report'}")
    print(f"report: {report.markdown.resolve()}")
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the demo's results."""
    head = ("| model | params | held-out CE (nats/token) | KL(teacher‖model) (nats/token) | exact-match accuracy "
            "| train FLOPs | wall time (s) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kl = r.get("teacher_kl", float("nan"))
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['heldout_ce']:.4f} | {'—' if kl != kl else f'{kl:.4f}'} "
            f"| {r['accuracy']:.1%} | "
            f"{r['train_flops']:.2e} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)
