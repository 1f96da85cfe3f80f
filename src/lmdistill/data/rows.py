"""Instruction rows from files: Dolly-style, prompt/response, or anything `datasets` loads.

Every row becomes ``{"id", "prompt", "response", ...}``; the other fields of the file are kept
(methods such as step-by-step read a ``rationale``). A bad row is an error naming the file, the
line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmdistill.io import UserError, utf8


class DataError(UserError, ValueError):
    """A data row is unusable; the message names file, line and field."""


def _text_field(row: dict, name: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{name}'")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def normalize_row(row: Any, where: str) -> dict:
    """One file row → ``{"prompt", "response", ...}``. Dolly rows join instruction and context."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "instruction" in row:
        instruction = _text_field(row, "instruction", where)
        context = _text_field(row, "context", where, required=False)
        prompt = instruction if not context else f"{instruction}\n\n{context}"
        field_of_prompt = "instruction"
    elif "prompt" in row:
        prompt = _text_field(row, "prompt", where)
        field_of_prompt = "prompt"
    else:
        raise DataError(f"{where}: missing field 'prompt' (or 'instruction' for Dolly-style rows)")
    response = _text_field(row, "response", where)
    assert prompt is not None and response is not None
    if not prompt.strip():
        raise DataError(f"{where}: field '{field_of_prompt}' is empty")
    if not response.strip():
        raise DataError(f"{where}: field 'response' is empty")
    # A Dolly row's context is part of its prompt; any other row's `context` (context distillation) is kept.
    out = {k: v for k, v in row.items() if k not in (("instruction", "context") if "instruction" in row else ())}
    out["prompt"], out["response"] = prompt, response
    out["_where"] = where
    return out


def jsonl_lines(path: str | Path, what: str = "data file") -> Iterator[tuple[str, int, Any]]:
    """(``file:line``, line number, parsed JSON) for each non-blank line of a JSONL file.

    A missing file ("no such `what`") or a line that is not JSON is a DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such {what}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a {what}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = utf8(raw, path, DataError, line=lineno)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file, normalised; ids default to ``<file stem>-<line>``."""
    path = Path(path)
    rows = []
    for where, lineno, raw in jsonl_lines(path):
        row = normalize_row(raw, where)
        row.setdefault("id", f"{path.stem}-{lineno}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_datasets_file(path: str | Path) -> list[dict]:
    """Rows of any local file the `datasets` library loads (csv, parquet, json, ...)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading this file needs `pip install datasets` (the `datasets` extra)") from None
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(path.suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (json, jsonl, csv, parquet)")
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    rows = []
    for i, raw in enumerate(ds):
        # `datasets` numbers rows from 0; a header line (csv) shifts file lines by one.
        row = normalize_row(dict(raw), f"{path}:row {i + 1}")
        row.setdefault("id", f"{path.stem}-{i + 1}")
        rows.append(row)
    return rows


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train / held-out split of a list of rows."""
    import random

    if not 0 < eval_fraction < 1:
        raise DataError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def check_unique_ids(rows: Iterable[dict], name: str) -> None:
    """Ids must be unique (resumable pipelines skip rows by id)."""
    seen: set[str] = set()
    for r in rows:
        if r["id"] in seen:
            raise DataError(f"{r.get('_where', name)}: duplicate id {r['id']!r}")
        seen.add(r["id"])
