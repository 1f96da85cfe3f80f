"""Test helpers: llama-cpp-python's OpenAI-compatible server, and a tiny scripted stdlib server.

Both listen on 127.0.0.1 only, on a free port, and are stopped by the fixtures that start them.
Every wait is bounded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp server cannot run here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (run scripts/install_llama_cpp.sh)"
    for module in ("uvicorn", "fastapi", "sse_starlette", "pydantic_settings"):
        if importlib.util.find_spec(module) is None:
            return f"llama-cpp-python's server extras are not installed ({module}; run scripts/install_llama_cpp.sh)"
    return None


class LlamaServer:
    """``python -m llama_cpp.server`` serving one GGUF on loopback, with ``--logits_all true``."""

    def __init__(self, model_path: Path, log_path: Path, *, port: int | None = None, alias: str = "teacher",
                 n_ctx: int = 2048, n_threads: int = 2, api_key: str | None = None) -> None:
        self.model_path, self.log_path = Path(model_path), Path(log_path)
        self.port = port or free_port()
        self.alias, self.n_ctx, self.n_threads, self.api_key = alias, n_ctx, n_threads, api_key
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> LlamaServer:
        """Start the process and wait until ``/v1/models`` answers (at most `timeout` seconds)."""
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--host", LOOPBACK,
               "--port", str(self.port), "--logits_all", "true", "--n_ctx", str(self.n_ctx),
               "--n_threads", str(self.n_threads), "--model_alias", self.alias]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                request = urllib.request.Request(self.url + "/models", headers=headers)
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"llama server did not answer within {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def count_ok(self, path: str = "/v1/completions") -> int:
        """Requests to `path` answered 200, from the access log."""
        return self.log_text().count(f'"POST {path} HTTP/1.1" 200')

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


Handler = Callable[[BaseHTTPRequestHandler, dict | None], tuple[int, dict, dict[str, str]]]
"""(request handler, parsed JSON body) -> (status, JSON reply, extra headers)."""


class ScriptedServer:
    """A stdlib HTTP server on loopback whose replies come from `handle`; records every request.

    ``requests``: list of (method, path, headers, body) received; ``max_in_flight``: the most
    requests it was handling at once.
    """

    def __init__(self, handle: Handler) -> None:
        self.requests: list[tuple[str, str, dict[str, str], dict | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with lock:
                    outer.requests.append((self.command, self.path, dict(self.headers), body))
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, reply, extra = handle(self, body)
                finally:
                    # Counted as done before the reply goes out: once the client has read it, it may send
                    # its next request before this thread would run again.
                    with lock:
                        outer.in_flight -= 1
                try:
                    data = json.dumps(reply).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            do_GET = do_POST = _serve

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def completion(text: str, **extra) -> dict:
    """A minimal /v1/completions reply."""
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": "stop", **extra}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def echo_handler(model, tokenizer, *, accept_ids: bool = True, shift: bool = False) -> Handler:
    """A /v1/completions that answers from a local causal LM, with OpenAI's echo semantics.

    ``accept_ids``: take a list of token ids as ``prompt`` (as vLLM does); otherwise 400.
    ``shift``: pair echoed prompt token t with the prediction made *at* t (for t + 1), as
    llama-cpp-python does without a leading BOS: a server whose echo is misaligned. Generates greedily, never a
    special token, one token at most (all the probe and scoring need).
    """
    import torch

    special = torch.tensor(tokenizer.all_special_ids)

    def top_dict(logp_row, k: int, extra: int) -> dict[str, float]:
        values, ids = logp_row.topk(k)
        out = {tokenizer.decode([int(i)]): float(v) for v, i in zip(values, ids)}
        out[tokenizer.decode([extra])] = float(logp_row[extra])
        return out

    def handle(req, body):
        if req.command == "GET":
            return 200, {"object": "list", "data": [{"id": "echo"}]}, {}
        prompt = body["prompt"]
        if isinstance(prompt, list) and not accept_ids:
            return 400, {"error": {"message": "prompt must be a string"}}, {}
        ids = list(prompt) if isinstance(prompt, list) else tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
        k = int(body.get("logprobs") or 0)
        last = logp[-1].clone()
        last[special] = -math.inf
        new = [int(last.argmax())] if body.get("max_tokens", 16) > 0 else []
        tokens = (ids if body.get("echo") else []) + new
        token_lps, tops = [], []
        for t, token in enumerate(tokens):
            pos = t if body.get("echo") else len(ids) + t  # position of `token` in prompt + generation
            row = pos if shift and pos < len(ids) else pos - 1  # the prediction paired with it
            if pos == 0 or row >= len(ids):
                token_lps.append(None)
                tops.append(None)
            else:
                token_lps.append(float(logp[row, token]))
                tops.append(top_dict(logp[row], k, token) if k else None)
        choice = {"index": 0, "text": "".join(tokenizer.decode([i]) for i in tokens), "finish_reason": "length"}
        if k:
            choice["logprobs"] = {"tokens": [tokenizer.decode([i]) for i in tokens], "token_logprobs": token_lps,
                                  "top_logprobs": tops, "text_offset": list(range(len(tokens)))}
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}
        return 200, {"object": "text_completion", "choices": [choice], "usage": usage}, {}

    return handle
