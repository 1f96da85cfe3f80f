"""Dense vs chunked divergence: peak extra memory and time of forward + backward, on CPU.

    python bench/divergence_memory.py [--vocab 32768 131072] [--positions 4096] [--hidden 512]
                                      [--name fkl] [--ce-weight W] [--chunk-size N] [--repeats 2]

For each vocabulary size V, both variants compute ``name`` (default fkl) between the student
head output ``hidden @ W.T`` (hidden (B, T, H) and W (V, H) float32, both requiring grad) and a
float32 teacher logits tensor (B, T, V), all positions unmasked (the worst case for the chunked
path, which skips masked positions), then backpropagate to hidden and W:

- dense:     ``LOSSES[name](F.linear(hidden, W), teacher, mask).backward()``
- chunked:   ``chunked_divergence(hidden, W, None, teacher, mask, name=name).backward()`` (the default:
  gradients computed chunk by chunk during forward, scaled in backward)
- recompute: the same with ``recompute=True`` (forward keeps only values; backward recomputes
  each chunk's logits)

With ``--ce-weight W`` > 0 (variants dense+ce, chunked+ce, recompute+ce) each computes kd's
(1 − W)·divergence + W·CE instead, on random labels (B, T) whose last position predicts nothing
(``prediction_mask``): dense as the kd method does, ``LOSSES[name](logits, ...)`` +
``response_ce_sum(logits, labels)``, each a mean over the positions; chunked with
``chunked_divergence_and_ce`` (the CE from the same chunks' logits).

Method. Each (V, variant) runs in a fresh subprocess, so that neither the allocator's cache nor
the high-water mark of one run leaks into another. In that process the inputs are allocated
first (written, so resident); then the kernel's peak-RSS counter is reset to the current RSS
(``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0) and the current RSS is taken as the baseline;
one forward + backward runs; **peak extra memory** = VmHWM − baseline, read from
/proc/self/status. It counts everything the step allocates: logits, autograd buffers, and the
gradients of hidden and W (the (V, H) float32 gradient of W is part of both variants' peak).
PyTorch's CPU allocator returns large blocks to the OS on free, so RSS follows live tensors.
That first step is not timed. **Time** is then the best of ``--repeats`` further forward +
backward steps in the same process (wall clock, gradients reset to None before each), with
PyTorch's default thread count. Ratios are each chunked variant / dense, from the same invocation.
Targets: memory ratio ≤ 0.15, time ratio ≤ 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import reset_peak, status_kib  # bench/ is on sys.path when a script here runs

VARIANTS = ["dense", "chunked", "recompute"]

def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from lmdistill.losses import LOSSES, chunked_divergence, chunked_divergence_and_ce, prediction_mask, response_ce_sum

    torch.manual_seed(0)
    (vocab,) = args.vocab
    batch, length = 4, args.positions // 4
    hidden = torch.randn(batch, length, args.hidden).requires_grad_()
    weight = torch.randn(vocab, args.hidden).mul_(args.hidden**-0.5).requires_grad_()
    teacher = torch.randn(batch, length, vocab).mul_(2.0)
    mask = torch.ones(batch, length, dtype=torch.bool)
    w = args.ce_weight
    if w > 0:
        labels = torch.randint(0, vocab, (batch, length))
        mask = prediction_mask(labels)
        n = int(mask.sum())

    def step() -> float:
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        if args.variant == "dense" and w > 0:
            logits = F.linear(hidden, weight)
            loss = (1 - w) * LOSSES[args.name](logits, teacher, mask) + w * response_ce_sum(logits, labels) / n
            del logits
        elif args.variant == "dense":
            loss = LOSSES[args.name](F.linear(hidden, weight), teacher, mask)
        elif w > 0:
            div, ce = chunked_divergence_and_ce(
                hidden, weight, None, teacher, mask, labels.roll(-1, dims=1), ce_weight=w, name=args.name,
                chunk_size=args.chunk_size, recompute=args.variant == "recompute",
            )  # fmt: skip
            loss = (1 - w) * div + w * ce
            del div, ce
        else:
            loss = chunked_divergence(
                hidden, weight, None, teacher, mask, name=args.name, chunk_size=args.chunk_size,
                recompute=args.variant == "recompute",
            )  # fmt: skip
        loss.backward()
        elapsed = time.perf_counter() - start
        del loss
        return elapsed

    baseline = reset_peak()
    cold = step()
    peak = status_kib("VmHWM")
    times = [step() for _ in range(args.repeats)]
    print(json.dumps({"peak_extra_mib": (peak - baseline) / 1024, "time_s": min(times), "cold_time_s": cold}))


def _run(args: argparse.Namespace, vocab: int, variant: str) -> dict[str, float]:
    cmd = [
        sys.executable, __file__, "--worker", "--variant", variant, "--vocab", str(vocab),
        "--positions", str(args.positions), "--hidden", str(args.hidden), "--name", args.name,
        "--repeats", str(args.repeats), "--ce-weight", str(args.ce_weight),
    ]  # fmt: skip
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        sys.exit(f"worker {variant} V={vocab} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--positions", type=int, default=4096, help="B·T (B = 4)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--name", default="fkl", help="divergence (a key of LOSSES)")
    parser.add_argument("--ce-weight", type=float, default=0.0,
                        help="with W > 0: (1 - W)·divergence + W·cross-entropy, as kd with alpha = 1 - W")
    parser.add_argument("--chunk-size", type=int, default=None, help="positions per chunk (default: max(64, 2**21 // V))")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the memory step; best is kept")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    if not 0 <= args.ce_weight <= 1:
        parser.error("--ce-weight must be in [0, 1]")
    suffix = "+ce" if args.ce_weight > 0 else ""
    print(
        f"divergence={args.name} ce_weight={args.ce_weight:g} positions={args.positions} hidden={args.hidden} float32, forward+backward, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, chunk_size={args.chunk_size or 'max(64, 2**21 // V)'}"
    )
    header = f"{'V':>7} {'variant':>12} {'peak extra MiB':>15} {'time s':>8} {'mem ratio':>10} {'time ratio':>11}"
    print(header)
    print("-" * len(header))
    missed = []
    for vocab in args.vocab:
        res = {variant: _run(args, vocab, variant) for variant in VARIANTS}
        dense = res["dense"]
        for variant, r in res.items():
            mem = r["peak_extra_mib"] / dense["peak_extra_mib"]
            tim = r["time_s"] / dense["time_s"]
            print(
                f"{vocab:>7} {variant + suffix:>12} {r['peak_extra_mib']:>15.0f} {r['time_s']:>8.2f} {mem:>10.3f} {tim:>11.3f}",
                flush=True,
            )
            if variant != "dense" and (mem > 0.15 or tim > 1.3):
                missed.append(f"{variant}{suffix} at V={vocab}")
    print(f"ratios: variant / dense; targets: memory <= 0.15, time <= 1.30; missed: {', '.join(missed) or 'none'}")


if __name__ == "__main__":
    main()
