"""``label``: the teacher answers each input prompt (optionally asked to think step by step).

Row: ``prompt``, ``response`` (the teacher's), ``reference`` (the input's gold response, if any),
``cot_prompt`` (with ``elicit.cot``: what was asked). An empty response is refused.
"""

from __future__ import annotations

from typing import Any

from lmdistill.elicit.session import Batch, Rows, Session, keep_or_reject


def elicit_label(s: Session, batch: Batch, seed: int) -> Rows:
    """(kept, rejected) rows of the teacher's answers to `batch`, sampled with `seed`."""
    e = s.e
    asked = [r["prompt"] + (f"\n\n{e.cot_instruction}" if e.cot else "") for r in batch]
    kept: list[dict] = []
    rejected: list[dict] = []
    for r, question, out in zip(batch, asked, s.generate(asked, seed)):
        row: dict[str, Any] = {"id": r["id"], "prompt": r["prompt"], "response": out.strip()}
        if e.cot:
            row["cot_prompt"] = question
        if (gold := r.get("response")) is not None:
            row["reference"] = gold
        row["provenance"] = s.provenance(seed)
        keep_or_reject(row, None if row["response"] else "empty response", kept, rejected)
    return kept, rejected
