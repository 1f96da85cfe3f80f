"""The teacher's forward in bfloat16 against float32 on this CPU: speed and the KL error it brings.

    python bench/teacher_bf16.py [--teacher pypi:smollm2-135m-instruct] [--batches 8] [--batch-size 8]
                                 [--threads N]

The teacher is loaded as a run loads it (``teacher.model.dtype=float32`` and ``=bfloat16``, through
``load_teacher``) and fed the same batches of the 316 instructions it answered
(`src/lmdistill/data/instructions_smollm2.jsonl`, max length 128), logits on the response window as KD
computes them, no gradient. Per dtype: the **median forward time** over the batches after the first (a
warm-up) of the
second pass over the same batches (**warm**: oneDNN builds a bf16 kernel per new input shape, so a
first sight of each batch's length pays that; a run sees each length again and again) and of the first
(**cold**), and for bf16 against fp32 on every response position: **KL(p_fp32 ‖ p_bf16)** (mean, and the
99th percentile), **top-1 agreement** and the largest absolute log-prob error on the fp32 top-1 token.
Both dtypes run in the same process, alternating per batch, so that the machine's state is shared.
The CPU's flags are printed: bf16 matrix units (AMX, ``amx_bf16``; AVX-512 ``avx512_bf16``) are what
make bf16 faster on a CPU; without them torch emulates it. Time only on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from lmdistill.config import DataConfig, ModelConfig, TeacherConfig
from lmdistill.data import collate, encode_rows, load_rows
from lmdistill.losses import prediction_mask, trained_window
from lmdistill.models import load_tokenizer
from lmdistill.teachers.load import load_teacher

ROWS = Path(__file__).resolve().parents[1] / "src" / "lmdistill" / "data" / "instructions_smollm2.jsonl"


def cpu_flags() -> str:
    """The bf16-relevant flags of this CPU, from /proc/cpuinfo ('' where unreadable)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="pypi:smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = TeacherConfig(kind="local", model=ModelConfig(path=args.teacher))
    tok = load_tokenizer(base.model)
    teachers = {d: load_teacher(dataclasses.replace(base, model=dataclasses.replace(base.model, dtype=d)), tok,
                                torch.device("cpu")) for d in ("float32", "bfloat16")}
    train, _ = load_rows(DataConfig(source="jsonl", train_path=str(ROWS), eval_fraction=0.05, max_length=128))
    rows = encode_rows(tok, train, max_length=128)
    times: dict[str, list[float]] = {d: [] for d in teachers}
    cold: dict[str, list[float]] = {}
    kls, agree, err = [], [], []
    for b in [*range(args.batches)] * 2:
        if b == 0 and times["float32"]:  # the second pass
            cold, times = times, {d: [] for d in teachers}
            kls, agree, err = [], [], []
        batch = collate(rows[b * args.batch_size : (b + 1) * args.batch_size], tok.pad_token_id)
        window = trained_window(batch["labels"])
        mask = prediction_mask(batch["labels"][:, window])
        logp = {}
        for d, teacher in teachers.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = teacher.logits(batch["input_ids"], batch["attention_mask"], window)
            times[d].append(time.perf_counter() - t0)
            logp[d] = torch.log_softmax(logits[mask].float(), dim=-1)  # (N, V)
        p32, p16 = logp["float32"], logp["bfloat16"]
        kls.append((p32.exp() * (p32 - p16)).sum(-1))
        top = p32.argmax(-1, keepdim=True)
        agree.append((p16.argmax(-1, keepdim=True) == top).float().flatten())
        err.append((p32.gather(-1, top) - p16.gather(-1, top)).abs().flatten())
    kl, ag, er = torch.cat(kls), torch.cat(agree), torch.cat(err)
    med = {d: statistics.median(t[1:]) for d, t in times.items()}
    med_cold = {d: statistics.median(t[1:]) for d, t in cold.items()}
    print(f"teacher {args.teacher}, {args.batches} batches of {args.batch_size}, response-window logits, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {cpu_flags() or 'none'}")
    for name, m in (("warm", med), ("cold", med_cold)):
        print(f"forward s, {name}: float32 {m['float32']:.3f}, bfloat16 {m['bfloat16']:.3f}; "
              f"bf16 / fp32 time {m['bfloat16'] / m['float32']:.2f}")
    print(f"over {kl.numel()} response positions: KL(fp32 || bf16) mean {kl.mean():.2e}, "
          f"p99 {kl.quantile(0.99):.2e}; top-1 agreement {ag.mean():.4f}; "
          f"max |log p error| on the fp32 top-1 {er.max():.3f}")


if __name__ == "__main__":
    main()
