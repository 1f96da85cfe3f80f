"""``context`` (context distillation): the teacher answers with a prefix the row leaves out.

Row: ``prompt`` (without the prefix), ``response`` (the teacher's, given
``context + "\\n\\n" + prompt``), ``context`` (the prefix), as the ``context`` training method
reads them. (A row with ``instruction`` is a Dolly row, whose ``context`` is part of its prompt;
these rows have none.) The demonstrations shown in the prefix are not elicited.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from lmdistill.config import ConfigError, RunConfig
from lmdistill.data.rows import DataError
from lmdistill.elicit.session import Batch, Rows, Session, fill, keep_or_reject


def context_prefix(cfg: RunConfig, inputs: Sequence[dict]) -> tuple[str, list[dict]]:
    """(prefix, demonstration rows): ``elicit.context``, ``elicit.context_file``, then
    ``elicit.context_demos`` input rows with a response, drawn with ``elicit.seed``."""
    e = cfg.elicit
    parts = []
    if e.context:
        parts.append(e.context.strip())
    if e.context_file:
        try:
            parts.append(Path(e.context_file).read_text(encoding="utf-8").strip())
        except OSError as err:
            raise ConfigError(f"elicit.context_file: cannot read {e.context_file} ({err.strerror})") from None
    demos: list[dict] = []
    if e.context_demos:
        with_response = [r for r in inputs if r.get("response")]
        if len(with_response) < e.context_demos:
            raise DataError(f"elicit.context_demos={e.context_demos} but only {len(with_response)} input rows have a "
                            "'response' to show as a demonstration")
        demos = random.Random(e.seed).sample(with_response, e.context_demos)
        parts.append("\n\n".join(fill(e.demo_template, "demo_template", prompt=d["prompt"], response=d["response"])
                                 for d in demos))
    if not any(parts):
        raise ConfigError("elicit context: the teacher needs a prefix; set elicit.context, elicit.context_file "
                          "or elicit.context_demos")
    return "\n\n".join(p for p in parts if p), demos


def elicit_context(s: Session, batch: Batch, seed: int, *, prefix: str) -> Rows:
    """(kept, rejected) rows of the teacher's answers to `prefix` + each prompt of `batch`."""
    asked = [f"{prefix}\n\n{r['prompt']}" for r in batch]
    kept: list[dict] = []
    rejected: list[dict] = []
    for r, out in zip(batch, s.generate(asked, seed)):
        row = {"id": r["id"], "prompt": r["prompt"], "response": out.strip(), "context": prefix,
               "provenance": s.provenance(seed)}
        keep_or_reject(row, None if row["response"] else "empty response", kept, rejected)
    return kept, rejected
