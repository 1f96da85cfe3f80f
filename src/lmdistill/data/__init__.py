"""Data sources, tokenising with response-only loss masks, and batching."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmdistill.config import DataConfig
from lmdistill.data.math import generate_math
from lmdistill.data.rows import DataError, check_unique_ids, read_datasets_file, read_jsonl, split_rows
from lmdistill.io import atomic_write_jsonl, cache_dir
from lmdistill.data.tokenize import IGNORE_INDEX, Encoded, collate, collate_prompts, encode_row, encode_rows

__all__ = [
    "DataError",
    "Encoded",
    "IGNORE_INDEX",
    "collate",
    "collate_prompts",
    "encode_row",
    "encode_rows",
    "load_rows",
]


def load_rows(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of a data config; each row has id, prompt, response."""
    if cfg.source == "math":
        return _cached_math(cfg, "train", cfg.n_train), _cached_math(cfg, "eval", cfg.n_eval)
    if not cfg.train_path:
        raise DataError(f"data.train_path is required for data.source={cfg.source}")
    read = read_jsonl if cfg.source == "jsonl" else read_datasets_file
    train = read(cfg.train_path)
    if cfg.eval_path:
        held = read(cfg.eval_path)
    else:
        train, held = split_rows(train, cfg.eval_fraction, cfg.seed)
    check_unique_ids(train, cfg.train_path)
    check_unique_ids(held, cfg.eval_path or cfg.train_path)
    return train, held


def _cached_math(cfg: DataConfig, split: str, n: int) -> list[dict]:
    """Math rows, generated once per (modules, difficulty, seed, split, n) and cached as JSONL."""
    key = json.dumps([list(cfg.math_modules), cfg.math_difficulty, cfg.seed, split, n])
    path = cache_dir() / "math" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    rows = generate_math(n, modules=cfg.math_modules, split=split, seed=cfg.seed, difficulty=cfg.math_difficulty)
    atomic_write_jsonl(path, rows)
    return rows
