"""`elicit(task, cfg)`: run one task over its inputs, batch by batch, into a resumable store.

Every task reads input rows (``elicit.input_path``, or the ``data`` section's training rows),
asks the teacher in batches of ``elicit.batch_size``, and flushes each batch to an
:class:`~lmdistill.elicit.store.ElicitStore`: kept rows to the output, refused ones (with a
``reason``) to ``<stem>.rejected.jsonl``. A rerun skips every id already in either file, so a
killed run resumes where its last flush ended; the sampling seed of a batch depends only on
``elicit.seed`` and the ids in it, so the resumed run writes what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmdistill.config import ConfigError, RunConfig
from lmdistill.data.rows import check_unique_ids
from lmdistill.elicit.context import context_prefix, elicit_context
from lmdistill.elicit.curate import elicit_curate, load_meta
from lmdistill.elicit.expand import elicit_expand
from lmdistill.elicit.inputs import load_inputs, read_inputs
from lmdistill.elicit.judge import check_judge_inputs, elicit_judge
from lmdistill.elicit.label import elicit_label
from lmdistill.elicit.preferences import check_ranking_teacher, elicit_preferences
from lmdistill.elicit.rationales import elicit_rationales
from lmdistill.elicit.session import Batch, Rows, Session, batch_seed, build_student, build_teacher
from lmdistill.elicit.store import ElicitStore
from lmdistill.teachers.base import Teacher

log = logging.getLogger(__name__)

TASKS = ("label", "expand", "rationales", "context", "preferences", "curate", "judge")


@dataclass
class ElicitResult:
    """What one call of :func:`elicit` did, and where the rows are."""

    task: str
    output: Path
    rejected_output: Path
    kept: int
    """Rows in the output (all, including those of earlier runs)."""
    rejected: int
    """Rows refused (all)."""
    new_kept: int
    """Rows kept by this call."""
    new_rejected: int
    """Rows refused by this call."""
    skipped: int
    """Inputs skipped because an earlier run finished them."""
    complete: bool
    """Every input is done (expand: the target number of instructions was reached; curate: that, or every
    combination was asked)."""
    seconds: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def _per_input(s: Session, rows: list[dict], store: ElicitStore, handler: Callable[[Session, Batch, int], Rows],
               started: float) -> tuple[int, int, int]:
    """Ask `handler` about the rows not done yet, a batch per flush; (skipped, new kept, new rejected)."""
    task, e = s.task, s.e
    pending = [r for r in rows if r["id"] not in store.done]
    skipped = len(rows) - len(pending)
    if skipped:
        log.info("%s: %d of %d inputs already done (%s)", task, skipped, len(rows), store.path)
    new_kept = new_rejected = 0
    for i in range(0, len(pending), e.batch_size):
        batch = pending[i : i + e.batch_size]
        kept, rejected = handler(s, batch, batch_seed(e.seed, task, [r["id"] for r in batch]))
        store.flush(kept, rejected, complete=i + e.batch_size >= len(pending))
        new_kept, new_rejected = new_kept + len(kept), new_rejected + len(rejected)
        log.info("%s: %d/%d inputs done (%d kept, %d rejected) in %.1fs", task, skipped + i + len(batch),
                 len(rows), len(store.kept_rows), len(store.rejected_rows), time.perf_counter() - started)
    if not pending:
        store.flush([], [], complete=True)
    return skipped, new_kept, new_rejected


def elicit(task: str, cfg: RunConfig, *, teacher: Teacher | None = None, student: tuple[Any, Any] | None = None,
           inputs: list[dict] | None = None) -> ElicitResult:
    """Run one elicitation task as `cfg` describes; resumes an interrupted run of the same output.

    Args:
        task: one of :data:`TASKS`.
        cfg: the run config (its ``elicit`` section; ``teacher``; ``student`` for preferences and
            judge's student samples; ``data`` when ``elicit.input_path`` is empty, except for curate).
        teacher: a ready teacher (else built from ``cfg.teacher``).
        student: (model, tokenizer) for preferences and judge (else built from ``cfg.student``).
        inputs: input rows (else :func:`load_inputs`; curate: ``elicit.input_path``'s, the prompts
            its instructions must differ from, else none).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown elicitation task {task!r}; known: {', '.join(TASKS)}")
    started = time.perf_counter()
    e = cfg.elicit
    if inputs is not None:
        rows = list(inputs)
    elif task == "curate":
        rows = read_inputs(e.input_path) if e.input_path else []
    else:
        rows = load_inputs(cfg)
    check_unique_ids(rows, e.input_path or "inputs")
    handlers: dict[str, Callable[[Session, Batch, int], Rows]] = {
        "label": elicit_label, "rationales": elicit_rationales, "preferences": elicit_preferences,
        "judge": elicit_judge}
    meta = load_meta(e.meta_path) if task == "curate" else {}
    if task == "judge":
        check_judge_inputs(rows, e)
    if task == "context":  # cheap checks before the teacher is loaded
        prefix, demos = context_prefix(cfg, rows)
        demo_ids = {d["id"] for d in demos}
        rows = [r for r in rows if r["id"] not in demo_ids]
        handlers["context"] = functools.partial(elicit_context, prefix=prefix)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher if teacher is not None else build_teacher(cfg, device)
    if task == "preferences":
        if e.rank:
            check_ranking_teacher(teacher)
        student = student if student is not None else build_student(cfg, device)
    if task == "judge" and e.judge_student_samples and student is None:
        student = build_student(cfg, device)
    session = Session(task, cfg, teacher, student)
    output = Path(e.output) if e.output else cfg.run_dir / "elicit" / f"{task}.jsonl"
    with ElicitStore(output, task=task, settings=session.settings) as store:
        if task == "expand":
            skipped, (new_kept, new_rejected) = 0, elicit_expand(session, rows, store)
        elif task == "curate":
            skipped, (new_kept, new_rejected) = 0, elicit_curate(session, meta, rows, store)
        else:
            skipped, new_kept, new_rejected = _per_input(session, rows, store, handlers[task], started)
        return ElicitResult(task=task, output=store.path, rejected_output=store.rejected_path,
                            kept=len(store.kept_rows), rejected=len(store.rejected_rows), new_kept=new_kept,
                            new_rejected=new_rejected, skipped=skipped, complete=bool(store.state["complete"]),
                            seconds=round(time.perf_counter() - started, 2))
