"""``preferences``: pairs of the teacher's output and a student sample for each prompt (DPO-style data).

Row: ``prompt``, ``chosen``, ``rejected``, ``response`` (= ``chosen``), ``chosen_source``
(teacher or student). With ``elicit.rank`` also ``teacher_logprob_chosen`` / ``_rejected``: the
teacher's mean log-prob per response token, the higher one chosen (needs a teacher that
scores: ``token``), and ``ranking`` (the distinct responses, best first), ``ranking_scores``,
``ranking_sources``; with ``elicit.num_samples`` = n > 1 the ranking holds the teacher's response
and n student samples (what ``method.form=pro`` trains on), chosen the best and rejected the worst.
Identical responses and an empty chosen one are refused.
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
    """(kept, rejected) pairs of the teacher's response and a student sample for each prompt of `batch`
    (with ``elicit.num_samples`` > 1 and ``elicit.rank``: the teacher's response and every sample, ranked)."""
    prompts = [r["prompt"] for r in batch]
    teacher_out = [t.strip() for t in s.generate(prompts, seed)]
    # The first sample's seed is what a single sample always had, so earlier outputs resume unchanged.
    seeds = [batch_seed(seed, "student")] + [batch_seed(seed, "student", j) for j in range(1, s.e.num_samples)]
    samples = [[t.strip() for t in s.sample_student(prompts, sd)] for sd in seeds]  # (num_samples, B)
    kept: list[dict] = []
    rejected: list[dict] = []
    candidates = [_candidates(teacher_out[i], [sample[i] for sample in samples]) for i in range(len(batch))]
    if s.e.rank:
        flat = [(p, text) for p, cands in zip(prompts, candidates) for text, _ in cands]
        flat_scores = iter(teacher_mean_logprobs(s.teacher, [p for p, _ in flat], [t for _, t in flat],
                                                 system_prompt=s.e.system_prompt))
        scores = [[next(flat_scores) for _ in cands] for cands in candidates]
    for i, r in enumerate(batch):
        cands = candidates[i]
        row: dict[str, Any] = {"id": r["id"], "prompt": r["prompt"]}
        reason = None
        if s.e.rank:
            order = list(range(len(cands)))
            if all(math.isfinite(x) for x in scores[i]):
                order.sort(key=lambda j: -scores[i][j])  # stable: a tie keeps the teacher's response first
            else:
                reason = "the teacher scored no token of a response"
            cands = [cands[j] for j in order]
            ranked = [scores[i][j] if math.isfinite(scores[i][j]) else None for j in order]
            row.update(teacher_logprob_chosen=ranked[0], teacher_logprob_rejected=ranked[-1])
            row.update(ranking=[t for t, _ in cands], ranking_scores=ranked, ranking_sources=[src for _, src in cands])
        (chosen, source), (other, _) = cands[0], cands[-1]
        row.update(response=chosen, chosen=chosen, rejected=other, chosen_source=source)
        if reason is None and len(cands) < 2:
            reason = "teacher and student responses are identical"
        elif reason is None and not chosen:
            reason = "empty chosen response"
        student = {**s.student_provenance(), "seed": seeds[0]}
        if len(seeds) > 1:
            student["seeds"] = seeds
        row["provenance"] = s.provenance(seed, student=student)
        keep_or_reject(row, reason, kept, rejected)
    return kept, rejected


def _candidates(teacher: str, samples: list[str]) -> list[tuple[str, str]]:
    """(response, source) of the teacher's response and the student's samples, each text once (first kept);
    a single response stands for both sides of an identical pair."""
    out: dict[str, str] = {}
    for text, source in [(teacher, "teacher"), *((x, "student") for x in samples)]:
        out.setdefault(text, source)
    return list(out.items())
