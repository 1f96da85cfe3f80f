"""Shared fixtures: tiny data and tiny configs, all built locally (no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmdistill.config import RunConfig, build


def write_addition_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """`n` rows of 'What is a + b?' → 'a+b', as prompt/response JSONL."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "response": str(a + b)}) + "\n")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def addition_data(tmp_path: Path) -> Path:
    return write_addition_jsonl(tmp_path / "train.jsonl", 64)


def tiny_run_config(data: Path, out: Path, **sections) -> RunConfig:
    """A run of a 2-layer, 32-wide Llama with the character tokenizer on a JSONL file."""
    base = {
        "name": "tiny",
        "output_dir": str(out),
        "student": {"tokenizer": "char", "n_layer": 2, "n_embd": 32, "n_head": 2, "max_position": 64},
        "data": {"source": "jsonl", "train_path": str(data), "max_length": 40, "eval_fraction": 0.125},
        "train": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 0},
        "eval": {"batch_size": 16, "n_generate": 0},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return build(RunConfig, base)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
