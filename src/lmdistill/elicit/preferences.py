"""``preferences``: pairs of the teacher's output and a student sample for each prompt (DPO-style data).

Row: ``prompt``, ``chosen``, ``rejected``, ``response`` (= ``chosen``), ``chosen_source``
(teacher or student). With ``elicit.rank`` also ``teacher_logprob_chosen`` / ``_rejected``: the
teacher's mean log-prob per response token, the higher one chosen (needs a teacher that
scores: ``token``). Identical responses and an empty chosen one are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lmdistill.config import ConfigError
from lmdistill.data.tokenize import IGNORE_INDEX, collate, encode_row
from lmdistill.elicit.session import Batch, Rows, Session, batch_seed, keep_or_reject
from lmdistill.teachers.base import Capability, Teacher, require


def check_ranking_teacher(teacher: Teacher) -> None:
    """Refuse, before anything is asked, a teacher that cannot score responses (``elicit.rank``)."""
    require(teacher.capability, Capability.TOKEN, method="elicit preferences with elicit.rank=true",
            backend=teacher.name)
    if teacher.tokenizer is None:
        raise ConfigError(f"elicit.rank: scoring responses needs the {teacher.name} teacher's tokenizer")


@torch.no_grad()
def teacher_mean_logprobs(teacher: Teacher, prompts: Sequence[str], responses: Sequence[str], *,
                          system_prompt: str | None = None) -> list[float]:
    """Length-normalised log-prob ``(1/|y|) Σ_t log p_T(y_t | x, y_<t)`` of each response under the teacher.

    Each (prompt, response) is tokenised by the teacher's tokenizer as a training row
    (:func:`lmdistill.data.tokenize.encode_row`; the end-of-turn marker is a response token),
    scored with ``teacher.score`` (B, T), and averaged over the response positions the teacher
    scored (finite values); NaN where it scored none.
    """
    tokenizer = teacher.tokenizer
    if tokenizer is None:
        raise ConfigError(f"elicit.rank: scoring responses needs the {teacher.name} teacher's tokenizer")
    encoded = [encode_row(tokenizer, {"prompt": p, "response": r, "id": str(i)}, max_length=1 << 30,
                          system_prompt=system_prompt) for i, (p, r) in enumerate(zip(prompts, responses))]
    batch = collate(encoded, tokenizer.pad_token_id)
    device = next(teacher.weights.parameters()).device if teacher.weights is not None else torch.device("cpu")
    scores = teacher.score(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()  # (B, T)
    counted = (batch["labels"] != IGNORE_INDEX) & torch.isfinite(scores)  # (B, T)
    sums = torch.where(counted, scores, torch.zeros_like(scores)).sum(dim=1)  # (B,)
    n = counted.sum(dim=1)  # (B,)
    return [float(s / c) if c > 0 else math.nan for s, c in zip(sums.tolist(), n.tolist())]


def elicit_preferences(s: Session, batch: Batch, seed: int) -> Rows:
    """(kept, rejected) pairs of the teacher's response and a student sample for each prompt of `batch`."""
    prompts = [r["prompt"] for r in batch]
    teacher_out = [t.strip() for t in s.generate(prompts, seed)]
    student_seed = batch_seed(seed, "student")
    student_out = [t.strip() for t in s.sample_student(prompts, student_seed)]
    if s.e.rank:
        t_scores = teacher_mean_logprobs(s.teacher, prompts, teacher_out, system_prompt=s.e.system_prompt)
        s_scores = teacher_mean_logprobs(s.teacher, prompts, student_out, system_prompt=s.e.system_prompt)
    kept: list[dict] = []
    rejected: list[dict] = []
    for i, r in enumerate(batch):
        chosen, other, source = teacher_out[i], student_out[i], "teacher"
        row: dict[str, Any] = {"id": r["id"], "prompt": r["prompt"]}
        reason = None
        if s.e.rank:
            ts, ss = t_scores[i], s_scores[i]
            if not (math.isfinite(ts) and math.isfinite(ss)):
                reason = "the teacher scored no token of a response"
            elif ss > ts:
                chosen, other, source = other, chosen, "student"
                ts, ss = ss, ts
            row.update(teacher_logprob_chosen=ts if math.isfinite(ts) else None,
                       teacher_logprob_rejected=ss if math.isfinite(ss) else None)
        row.update(response=chosen, chosen=chosen, rejected=other, chosen_source=source)
        if reason is None and chosen == other:
            reason = "teacher and student responses are identical"
        elif reason is None and not chosen:
            reason = "empty chosen response"
        row["provenance"] = s.provenance(seed, student={**s.student_provenance(), "seed": student_seed})
        keep_or_reject(row, reason, kept, rejected)
    return kept, rejected
