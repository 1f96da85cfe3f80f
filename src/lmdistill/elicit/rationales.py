"""``rationales`` (distilling step-by-step, Hsieh et al. 2023): a rationale and a final answer per input.

Row: ``prompt``, ``rationale``, ``response`` (the final answer), ``gold``, ``answer_correct``.
Kept when the answer equals the gold one under :func:`lmdistill.data.math.normalize_answer`
(rows without gold are kept, with ``answer_correct: null``); a refused row keeps the whole
reply as ``raw``.
"""

from __future__ import annotations

import re
from typing import Any

from lmdistill.data.math import normalize_answer
from lmdistill.elicit.inputs import gold_answer
from lmdistill.elicit.session import Batch, Rows, Session, fill, keep_or_reject

_ANSWER = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer(?:\*\*)?\s*(?:is)?\s*[:：]")
_LATEX_DELIMITERS = re.compile(r"\\[\[\]()]")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def parse_rationale(text: str) -> tuple[str, str] | None:
    """(rationale, answer) of a reply ending with an ``Answer: ...`` line; None without one.

    The last ``Answer:`` (or ``Final answer:``, ``the answer is:``) marker splits the reply: what is
    before is the rationale; the answer is the first non-empty line after it, with LaTeX math
    delimiters (``\\[ \\] \\( \\)``) and ``\\boxed{}`` unwrapped, markdown ``**``, backticks, ``$``
    and a final period removed.
    """
    matches = list(_ANSWER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    rest = _BOXED.sub(r"\1", _LATEX_DELIMITERS.sub(" ", text[m.end():]))
    cleaned = (line.strip().strip("*`$ \t").rstrip(".").strip("*`$ \t") for line in rest.splitlines())
    answer = next((line for line in cleaned if line), "")
    rationale = text[: m.start()].rstrip().rstrip("*#").strip()
    return rationale, answer


def elicit_rationales(s: Session, batch: Batch, seed: int) -> Rows:
    """(kept, rejected) rows of the teacher's rationales and answers for `batch`, checked against the gold."""
    asked = [fill(s.e.rationale_template, "rationale_template", prompt=r["prompt"]) for r in batch]
    kept: list[dict] = []
    rejected: list[dict] = []
    for r, out in zip(batch, s.generate(asked, seed)):
        gold = gold_answer(r)
        row: dict[str, Any] = {"id": r["id"], "prompt": r["prompt"], "gold": gold}
        parsed = parse_rationale(out)
        reason = None
        if parsed is None:
            reason = "no 'Answer:' line in the reply"
        else:
            rationale, answer = parsed
            correct = None if gold is None else normalize_answer(answer) == normalize_answer(gold)
            row.update(rationale=rationale, response=answer, answer_correct=correct)
            if not answer:
                reason = "empty answer"
            elif not rationale:
                reason = "no rationale before the answer"
            elif correct is False:
                reason = f"answer {answer!r} does not match the gold {gold!r}"
        if reason is not None:
            row["raw"] = out  # the whole reply, to see why
        row["provenance"] = s.provenance(seed)
        keep_or_reject(row, reason, kept, rejected)
    return kept, rejected
