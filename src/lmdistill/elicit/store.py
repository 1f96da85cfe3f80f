"""A resumable, crash-safe JSONL output: rows appended per flush, committed by an atomic state file.

Three files share a stem (``label.jsonl`` → ``label.rejected.jsonl``, ``label.state.json``):

- the output: one JSON object per kept row;
- the rejected rows (each with a ``reason``), so that a resumed run skips them too;
- the state: the task, how many bytes of each file are committed, and task-specific progress.

A flush appends the new lines to both files (fsync), then replaces the state atomically. The state
is the commit point: whatever lies beyond the committed byte counts (a flush torn by a crash, or
one whose state was never written) is cut off when the store is reopened, so every reopened store
holds exactly the rows of whole flushes. A second process writing the same output is refused (an
exclusive lock on ``label.lock``, :class:`lmdistill.rundir.FileLock`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lmdistill.config import ConfigError
from lmdistill.data.rows import DataError
from lmdistill.io import atomic_write_json
from lmdistill.rundir import FileLock, read_json

log = logging.getLogger(__name__)


def sibling(path: Path, suffix: str) -> Path:
    """`out/label.jsonl`, `.rejected.jsonl` → `out/label.rejected.jsonl`."""
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(stem + suffix)


class ElicitStore:
    """Kept and rejected rows of one elicitation task, with the ids already finished.

    Args:
        path: the output JSONL.
        task: the elicitation task; reopening an output written by another task is an error.
        settings: what produced the rows (teacher, sampling); a change on resume is logged.
    """

    def __init__(self, path: str | Path, *, task: str, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.rejected_path = sibling(self.path, ".rejected.jsonl")
        self.state_path = sibling(self.path, ".state.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(sibling(self.path, ".lock"), busy=f"{self.path}: another `lmdistill elicit` is "
                              "writing this output; wait for it, or set elicit.output to another file")
        self.task = task
        if self.state_path.exists():
            self.state = read_json(self.state_path)
            if self.state.get("task") != task:
                self.close()
                raise ConfigError(
                    f"{self.path} holds `{self.state.get('task')}` output, not `{task}`: "
                    "set elicit.output to another file")
            if self.state.get("settings") != settings:
                log.warning("%s: resuming with other settings than the finished rows had (%s → %s); each row's "
                            "provenance records its own", self.path, self.state.get("settings"), settings)
                self.state["settings"] = settings
        else:
            for p in (self.path, self.rejected_path):
                if p.exists() and p.stat().st_size > 0:
                    self.close()
                    raise ConfigError(
                        f"{p} exists but {self.state_path.name} does not, so it was not written by "
                        "`lmdistill elicit` (or its state was deleted): move it away or set elicit.output")
            self.state = {"task": task, "settings": settings, "bytes": {"kept": 0, "rejected": 0},
                          "rows": {"kept": 0, "rejected": 0}, "progress": {}, "complete": False}
        self.kept_rows = self._recover(self.path, "kept")
        self.rejected_rows = self._recover(self.rejected_path, "rejected")
        self.done: set[str] = {str(r["id"]) for r in self.kept_rows + self.rejected_rows}

    def _recover(self, path: Path, which: str) -> list[dict]:
        """The committed rows of one file, after cutting off anything beyond the committed bytes."""
        committed = int(self.state["bytes"][which])
        size = path.stat().st_size if path.exists() else 0
        if size < committed:
            raise DataError(f"{path}: {size} bytes on disk but {committed} were committed "
                            f"({self.state_path.name}); the file was truncated or replaced")
        if size > committed:
            log.warning("%s: dropping %d uncommitted bytes (an interrupted flush)", path, size - committed)
            with path.open("r+b") as f:
                f.truncate(committed)
        rows = []
        if committed:
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    if "id" not in rows[-1]:
                        raise DataError(f"{path}:{lineno}: missing field 'id'")
        if len(rows) != self.state["rows"][which]:
            raise DataError(f"{path}: {len(rows)} rows but {self.state['rows'][which]} were committed")
        return rows

    @property
    def progress(self) -> dict[str, Any]:
        """Task-specific progress committed with the rows (e.g. expand's round counter)."""
        return self.state["progress"]

    def flush(self, kept: list[dict], rejected: list[dict], *, progress: dict[str, Any] | None = None,
              complete: bool = False) -> None:
        """Append rows to both files and commit them (and `progress`) with one atomic state write."""
        for path, rows, which in ((self.path, kept, "kept"), (self.rejected_path, rejected, "rejected")):
            if not rows:
                continue
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            with path.open("ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.state["bytes"][which] += len(data)
            self.state["rows"][which] += len(rows)
        self.kept_rows += kept
        self.rejected_rows += rejected
        self.done.update(str(r["id"]) for r in kept + rejected)
        if progress is not None:
            self.state["progress"] = progress
        self.state["complete"] = complete
        atomic_write_json(self.state_path, self.state)

    def close(self) -> None:
        """Release the lock."""
        self._lock.close()

    def __enter__(self) -> ElicitStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
