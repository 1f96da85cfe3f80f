"""The output head of a decoding step: the head's own product h·Wᵀ against lmdistill's DecodeHead (W·hᵀ).

    python bench/decode_head.py [--teacher pypi:smollm2-135m-instruct] [--rows 1 2 4 8 16 32 64]
                                [--new-tokens 32] [--batch-size 8] [--threads N]

Part 1, the head alone: for heads of SmolLM2's shape (49,152 x 256, the bench students', and x 576, the
teacher's), float32, the median time of `rows` hidden states through ``nn.Linear`` and through
:class:`lmdistill.generation.DecodeHead` around the same weight, and their largest absolute difference.
Part 2, end to end: on-policy sampling as training runs it (``sample_ids``: 8 of the 316 instructions,
`--new-tokens` new tokens each, temperature 1) with a new 4 x 256 student over SmolLM2's tokenizer, the head
as it was (the context manager that swaps it in made a no-op) against the DecodeHead; the median of 5
timed calls each, alternating, after one untimed call each. Ratios are DecodeHead / linear, measured in the same
invocation. Time only on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import transformers

from lmdistill import generation
from lmdistill.config import ModelConfig
from lmdistill.data.tokenize import render_prompt
from lmdistill.generation import DecodeHead, sample_ids
from lmdistill.models import load_model, load_tokenizer

ROWS = Path(__file__).resolve().parents[1] / "src" / "lmdistill" / "data" / "instructions_smollm2.jsonl"


def median_ms(f, n: int = 20) -> float:
    """Median wall time of `f()` in milliseconds over `n` calls after one untimed call."""
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def head_alone(rows: list[int], vocab: int) -> None:
    print(f"head alone, float32, V = {vocab}: ms per call")
    print(f"{'H':>5} {'rows':>5} {'linear':>8} {'decode':>8} {'ratio':>6} {'max |diff|':>11}")
    for width in (256, 576):
        head = torch.nn.Linear(width, vocab, bias=False)
        fast = DecodeHead(head)
        for m in rows:
            h = torch.randn(m, 1, width)
            with torch.no_grad():
                a, b = median_ms(lambda: head(h)), median_ms(lambda: fast(h))
                diff = float((head(h) - fast(h)).abs().max())
            print(f"{width:>5} {m:>5} {a:>8.2f} {b:>8.2f} {b / a:>6.2f} {diff:>11.1e}")


def end_to_end(args: argparse.Namespace) -> None:
    tok = load_tokenizer(ModelConfig(path=args.teacher))
    student = load_model(ModelConfig(tokenizer=args.teacher, n_layer=4, n_embd=256, n_head=4), tok, seed=0)
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()[: args.batch_size]]
    prompts = [tok(render_prompt(tok, r["prompt"], None), add_special_tokens=False)["input_ids"] for r in rows]

    def sample() -> None:
        sample_ids(student, prompts, pad_id=tok.pad_token_id, eos_id=-1, max_new_tokens=args.new_tokens)

    plain = mock.patch.object(generation, "decode_head", lambda model: contextlib.nullcontext())
    times: dict[str, list[float]] = {"linear": [], "decode": []}
    for i in range(6):
        for name in times:
            with plain if name == "linear" else contextlib.nullcontext():
                t0 = time.perf_counter()
                sample()
                if i:
                    times[name].append(time.perf_counter() - t0)
    lin, dec = (statistics.median(times[k]) for k in ("linear", "decode"))
    print(f"sample_ids, {args.batch_size} prompts x {args.new_tokens} new tokens, student 4 x 256 over {len(tok)} "
          f"tokens: linear head {lin:.3f} s, DecodeHead {dec:.3f} s; ratio {dec / lin:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="pypi:smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # eos_id = -1 (never stop) is what the sampling here wants
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    head_alone(args.rows, 49152)
    end_to_end(args)


if __name__ == "__main__":
    main()
