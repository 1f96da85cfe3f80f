"""GPU check of the teacher under the engine (issue 16.2): placement and FSDP sharding, on one GPU.

    PYTHONPATH=src python3 bench/gpu_teacher.py [--work DIR] [--steps 6] [--dry-run]

The GPU image lacks tenacity, which lmdistill imports: carry the `.whl/` that `python bench/gpu_kd_step.py
prepare` writes and install it first, as that script's docstring shows (then PYTHONPATH=/tmp/site:src).

About 3 minutes on one H200 (budget: 8). The same KD run (method kd, fkl, batch 8, 64 tokens, float32)
of a 4-layer, 256-wide student from a 1.2B-parameter teacher (24 layers, width 2048, random weights,
both with the character tokenizer, built here: nothing to download), in three variants, each the real
loop (`lmdistill.train.fit`) in a fresh process:

- ``gpu``: student and teacher on cuda:0 (the default);
- ``teacher-cpu``: ``teacher.device=cpu``: the teacher's forwards on the CPU, its logits moved to the
  student's GPU by the device hook (teachers/engine.py);
- ``fsdp1``: ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1``: the real
  accelerate FSDP path (distributed_type FSDP, FSDP2 on the student, the teacher sharded by
  ``shard_teacher``) on one process, where a shard is the whole model; a checkpoint at step 3.

Printed per variant: the losses, the median step time, the peak GPU memory (``max_memory_allocated``),
where the teacher is and whether it is sharded (its parameters DTensors). Checked (PASS/FAIL lines, exit
status 1 on a FAIL): teacher-cpu's losses equal gpu's (relative 1e-4: CPU and GPU round differently) and its
peak GPU memory is lower by at least 3/4 of the teacher's 4.8 GB; fsdp1's losses equal gpu's (relative 1e-5),
its teacher is sharded, and its checkpoint holds the student's weights only.

Not checkable on one GPU: sharding across 2+ GPUs (NCCL refuses two processes on one GPU); the CPU
test (tests/test_teacher_engine.py) checks that with gloo; tests/test_checkpoint.py's fsdp layout
needs 2 GPUs. DeepSpeed ZeRO-3 needs deepspeed, which the GPU image lacks.

``--dry-run`` runs the same mechanics on the CPU with a 2-layer teacher (to check the script itself; its
memory and FSDP checks then FAIL, as there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["gpu", "teacher-cpu", "fsdp1"]
TEACHER = {"n_layer": 24, "n_embd": 2048, "n_head": 16}
DRY_TEACHER = {"n_layer": 2, "n_embd": 64, "n_head": 4}


def write_data(path: Path, n: int = 256) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "response": f"{a}+{b}={a + b}"}) + "\n")
    return path


def build_teacher(directory: Path, sizes: dict) -> None:
    from lmdistill.config import ModelConfig
    from lmdistill.models import load_model, load_tokenizer, save_model

    spec = ModelConfig(tokenizer="char", max_position=128, **sizes)
    tok = load_tokenizer(spec)
    save_model(load_model(spec, tok, seed=1), tok, directory)


def overrides(variant: str, work: Path, steps: int) -> list[str]:
    out = [f"name=gpu_{variant}", f"output_dir={work / variant}", f"train.steps={steps}", "train.batch_size=8",
           "train.lr=1e-4", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0",
           "train.mixed_precision='no'", f"train.checkpoint_every={3 if variant == 'fsdp1' else 0}",
           "data.source=jsonl", f"data.train_path={work / 'data.jsonl'}", "data.max_length=64", "data.eval_fraction=0.05",
           "eval.n_generate=0", "student.tokenizer=char", "student.n_layer=4", "student.n_embd=256", "student.n_head=4",
           "student.max_position=128", "teacher.kind=local", f"teacher.model.path={work / 'teacher'}", "method.name=kd"]
    return out + (["teacher.device=cpu"] if variant == "teacher-cpu" else [])


def worker(variant: str, work: Path, steps: int) -> dict:
    import torch
    from torch.distributed.tensor import DTensor

    import lmdistill.train as train
    from lmdistill.methods import load_config
    from lmdistill.models import load_model
    from lmdistill.rundir import read_metrics

    runs = []
    setup = train.setup
    train.setup = lambda cfg: runs.append(setup(cfg)) or runs[-1]  # keep the Run to look at its teacher
    cfg = load_config(None, overrides(variant, work, steps))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    train.fit(cfg, progress=False)
    run = runs[0]
    if not run.accelerator.is_main_process:
        return {}
    teacher = run.ctx.teacher.weights
    params = list(teacher.parameters())
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    out = {"variant": variant, "distributed_type": str(run.accelerator.distributed_type),
           "processes": run.accelerator.num_processes, "losses": [r["loss"] for r in rows],
           "step_s": statistics.median(times) if times else None,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0,
           "teacher_device": str(params[0].device), "teacher_sharded": run.ctx.teacher.sharded,
           "teacher_dtensors": all(isinstance(p, DTensor) for p in params),
           "teacher_params": sum(p.numel() for p in params),
           "teacher_local_params": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)}
    ckpt = cfg.run_dir / "checkpoints" / "step_00000003" / "pytorch_model_fsdp.bin"
    if ckpt.exists():
        keys = set(torch.load(ckpt, weights_only=True, map_location="cpu"))
        student = set(load_model(cfg.student, run.tokenizer).state_dict())
        out["checkpoint_keys_are_the_students"] = bool(keys) and keys <= student
        out["checkpoint_mib"] = ckpt.stat().st_size / 2**20
    return out


def launch(variant: str, work: Path, steps: int) -> dict:
    result = work / f"{variant}.json"
    me = [str(Path(__file__).resolve()), "--worker", variant, "--work", str(work), "--steps", str(steps)]
    if variant == "fsdp1":
        launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
        cmd = [launcher if os.path.exists(launcher) else "accelerate", "launch", "--config_file",
               str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "1", *me]
    else:
        cmd = [sys.executable, *me]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 or not result.exists():
        print(f"{variant}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return {"variant": variant, "failed": True}
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dry-run", action="store_true", help="a 2-layer teacher, on the CPU when there is no GPU")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out = worker(args.worker, args.work, args.steps)
        if out:
            (args.work / f"{args.worker}.json").write_text(json.dumps(out))
        return
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("bench/gpu_teacher.py needs a GPU (--dry-run checks the script on the CPU)")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_teacher_"))
    work.mkdir(parents=True, exist_ok=True)
    write_data(work / "data.jsonl")
    build_teacher(work / "teacher", DRY_TEACHER if args.dry_run else TEACHER)
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    print(f"{where}, torch {torch.__version__}; work directory {work}")
    results = {v: launch(v, work, args.steps) for v in VARIANTS}
    for r in results.values():
        print(json.dumps(r))
    checks = []
    gpu, cpu, fsdp = results["gpu"], results["teacher-cpu"], results["fsdp1"]

    def close(a: dict, b: dict, rel: float) -> bool:
        return not a.get("failed") and not b.get("failed") and len(a["losses"]) == len(b["losses"]) and all(
            abs(x - y) <= rel * abs(y) for x, y in zip(a["losses"], b["losses"]))

    teacher_gib = 4 * gpu["teacher_params"] / 2**30 if not gpu.get("failed") else float("nan")  # float32
    checks.append(("teacher-cpu losses = gpu losses (rel 1e-4)", close(cpu, gpu, 1e-4)))
    checks.append((f"teacher-cpu peak GPU memory lower by >= 3/4 of the teacher's {teacher_gib:.2f} GiB",
                   not cpu.get("failed") and not gpu.get("failed")
                   and gpu["peak_gpu_gib"] - cpu["peak_gpu_gib"] >= 0.75 * teacher_gib))
    checks.append(("teacher-cpu: the teacher is on the CPU", cpu.get("teacher_device") == "cpu"))
    checks.append(("fsdp1 runs under accelerate's FSDP", fsdp.get("distributed_type") == "DistributedType.FSDP"))
    checks.append(("fsdp1: the teacher is sharded (DTensor parameters)",
                   bool(fsdp.get("teacher_sharded") and fsdp.get("teacher_dtensors"))))
    checks.append(("fsdp1 losses = gpu losses (rel 1e-5)", close(fsdp, gpu, 1e-5)))
    checks.append(("fsdp1 checkpoint holds the student's weights only (its keys, under 1/10 of the teacher's size)",
                   fsdp.get("checkpoint_keys_are_the_students") is True
                   and fsdp["checkpoint_mib"] < 0.1 * 1024 * teacher_gib))
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for r in results.values():
        if not r.get("failed"):
            print(f"{r['variant']:12s} step {r['step_s']:.3f} s  peak GPU {r['peak_gpu_gib']:.2f} GiB  teacher on "
                  f"{r['teacher_device']} (sharded: {r['teacher_sharded']})")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
