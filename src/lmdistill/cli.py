"""`lmdistill` command line: run, eval, quickstart."""

from __future__ import annotations

import argparse
import json
import sys

from lmdistill.config import ConfigError, describe


def _config_help() -> str:
    from lmdistill.methods import METHODS

    lines = ["config keys (override as key=value):"]
    for key, default, doc in describe():
        lines.append(f"  {key} = {default}\n      {doc}")
    lines.append("methods: " + ", ".join(sorted(METHODS)))
    for name, cls in sorted(METHODS.items()):
        rows = [r for r in describe(cls.config_class, "method.") if r[0] != "method.name"]
        for key, default, doc in rows:
            lines.append(f"  [{name}] {key} = {default}\n      {doc}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from lmdistill.config import load_config
    from lmdistill.evaluate import evaluate_run
    from lmdistill.train import fit

    cfg = load_config(args.config, args.overrides)
    result = fit(cfg)
    if result.step == cfg.train.steps and not args.no_eval:
        from accelerate import PartialState

        if PartialState().is_main_process:
            ev = evaluate_run(result.run_dir)
            print(json.dumps({k: v for k, v in ev.items() if k != "examples"}, indent=2))
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmdistill.evaluate import evaluate_run

    ev = evaluate_run(args.run_dir)
    print(json.dumps(ev, indent=2))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from lmdistill.quickstart import quickstart

    quickstart(out_dir=args.out, scale=args.scale)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `lmdistill` argument parser (every command has --help)."""
    p = argparse.ArgumentParser(prog="lmdistill", description="Knowledge distillation of language models.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run",
        help="train a student with a method from a YAML config, then evaluate it",
        description="Train a student as CONFIG describes (overridden by key=value), then evaluate it.",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("config", help="YAML config file (see configs/)")
    r.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4 method.name=sft")
    r.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="evaluate the final model of a run directory", description="Evaluate a run directory's model; writes eval.json there.")
    e.add_argument("run_dir", help="run directory written by `lmdistill run`")
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser(
        "quickstart",
        help="the offline demo: math data, a teacher from scratch, a student, a comparison table",
        description="Generate math data, train a teacher from scratch, train a much smaller student, "
        "evaluate both and print a table. Runs offline on a CPU in about 10 minutes.",
    )
    q.add_argument("--out", default="runs/quickstart", help="directory for the runs (default: runs/quickstart)")
    q.add_argument("--scale", type=float, default=1.0, help="multiply training steps by this (0.1 for a smoke run)")
    q.set_defaults(func=cmd_quickstart)
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
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"lmdistill: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from lmdistill.data import DataError

        if isinstance(e, DataError):
            print(f"lmdistill: data error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
