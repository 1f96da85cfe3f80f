"""The rows an elicitation task reads: ``elicit.input_path``, or the ``data`` section's training rows."""

from __future__ import annotations

from pathlib import Path

from lmdistill.config import RunConfig
from lmdistill.data import load_rows
from lmdistill.data.rows import DataError, check_unique_ids, jsonl_lines, normalize_row


def read_inputs(path: str | Path) -> list[dict]:
    """Input rows of a JSONL file: ``prompt`` (or Dolly ``instruction`` + ``context``), optional ``id``
    (default ``<stem>-<line>``), optional gold ``response`` / ``answer``. Errors name file, line, field."""
    path = Path(path)
    rows = []
    for where, lineno, raw in jsonl_lines(path, "input file (elicit.input_path)"):
        if isinstance(raw, dict) and raw.get("response") is None:
            # The prompt is checked (and a Dolly row joined) as for training rows; the response is optional.
            row = normalize_row({**raw, "response": "-"}, where)
            del row["response"]
        else:
            row = normalize_row(raw, where)
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
        row["id"] = str(row.get("id", f"{path.stem}-{lineno}"))
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    check_unique_ids(rows, str(path))
    return rows


def load_inputs(cfg: RunConfig) -> list[dict]:
    """The rows to elicit from: ``elicit.input_path``, else the training rows of the ``data`` section."""
    if cfg.elicit.input_path:
        rows = read_inputs(cfg.elicit.input_path)
    else:
        rows = [{**r, "id": str(r["id"])} for r in load_rows(cfg.data)[0]]
    return rows[: cfg.elicit.max_inputs] if cfg.elicit.max_inputs else rows


def gold_answer(row: dict) -> str | None:
    """The input's gold answer: its ``answer`` field, else its ``response``; None when it has neither."""
    value = row.get("answer", row.get("response"))
    return None if value is None else str(value)
