"""``judge`` (seed 001's *feedback*; RLAIF, UltraFeedback): the teacher grades responses into preference pairs.

Each input row brings its responses: ``responses`` (a list of strings), else ``chosen`` and
``rejected`` (e.g. ``elicit preferences`` rows), else ``response``; ``elicit.judge_student_samples``
student samples are added to them. The parsing and the consistency rules are
:mod:`lmdistill.judging`'s.

- ``elicit.judge=pairwise`` (two responses): the teacher is asked which is better with the first
  shown as A, then with it shown as B. A pair is kept only when both orders choose the same
  response; a judge that prefers a position, refuses, calls a tie or gives no letter makes the
  row rejected, with the reason. Margin: (votes for − votes against) / votes.
- ``elicit.judge=pointwise`` (two or more): each response is scored on the rubric from
  ``elicit.score_min`` to ``elicit.score_max`` (the mean over ``elicit.judge_votes``); chosen is
  the best, rejected the worst; margin: their difference over the scale's width. Equal scores
  are a rejected row.

Row: ``prompt``, ``chosen``, ``rejected``, ``response`` (= ``chosen``, as ``elicit preferences``
writes them, for ``method.name=dpkd``, ``method.chosen=data``), ``margin`` in (0, 1],
``chosen_source`` / ``rejected_source``, ``responses`` and ``sources`` (every response judged),
``scores`` (pointwise, one per response), ``judge`` (the mode) and ``judgements``: every question
asked, with the judge's raw answer, the parsed value and why it was refused.
"""

from __future__ import annotations

from typing import Any

from lmdistill.config import ElicitConfig
from lmdistill.data.rows import DataError
from lmdistill.elicit.session import Batch, Rows, Session, batch_seed, fill, judge_template, keep_or_reject
from lmdistill.judging import (Verdict, best_and_worst, mean_scores, pairwise_prompt, parse_choice, parse_score,
                               pointwise_prompt, swap_consistent)


def row_responses(row: dict) -> list[tuple[str, str]]:
    """(text, source) of the responses a row brings: ``responses``, else ``chosen`` + ``rejected``, else ``response``."""
    where = row.get("_where", f"row {row['id']}")
    if "responses" in row:
        texts = row["responses"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: field 'responses' must be a list of strings")
        return [(t, f"responses[{i}]") for i, t in enumerate(texts)]
    if "chosen" in row or "rejected" in row:
        out = []
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: field '{key}' must be a string (a pair has 'chosen' and 'rejected')")
            out.append((row[key], key))
        return out
    return [(row["response"], "response")] if isinstance(row.get("response"), str) else []


def check_judge_inputs(rows: list[dict], e: ElicitConfig) -> None:
    """Refuse, before the teacher is loaded, a template that cannot be filled and a row with too few (or,
    pairwise, too many) responses."""
    template, _ = judge_template(e)
    if e.judge == "pairwise":
        fill(template, "pairwise_template", prompt="", a="", b="", rubric="")
    else:
        fill(template, "pointwise_template", prompt="", response="", rubric="", low="", high="")
    for row in rows:
        n = len(row_responses(row)) + e.judge_student_samples
        if n < 2 or (e.judge == "pairwise" and n > 2):
            where = row.get("_where", f"row {row['id']}")
            need = "exactly 2" if e.judge == "pairwise" else "2 or more"
            raise DataError(f"{where}: elicit judge ({e.judge}) needs {need} responses per row, this one has {n} "
                            f"(its 'responses', or 'chosen' + 'rejected', or 'response', plus "
                            f"elicit.judge_student_samples={e.judge_student_samples})"
                            + ("; use elicit.judge=pointwise for more" if n > 2 else ""))


def _ask(s: Session, questions: list[list[str]], seed: int) -> list[list[list[str]]]:
    """answers[row][question][vote]: every question asked `judge_votes` times, batched over the rows."""
    flat = [q for qs in questions for q in qs]
    votes = [s.generate(flat, seed if v == 0 else batch_seed(seed, "vote", v)) for v in range(s.e.judge_votes)]
    out, at = [], 0
    for qs in questions:
        out.append([[votes[v][at + j] for v in range(s.e.judge_votes)] for j in range(len(qs))])
        at += len(qs)
    return out


def elicit_judge(s: Session, batch: Batch, seed: int) -> Rows:
    """(kept, rejected) preference pairs of `batch`'s responses, as the teacher judged them."""
    e = s.e
    responses = [row_responses(r) for r in batch]
    student_seeds = [batch_seed(seed, "student", k) for k in range(e.judge_student_samples)]
    for student_seed in student_seeds:
        for mine, text in zip(responses, s.sample_student([r["prompt"] for r in batch], student_seed)):
            mine.append((text.strip(), "student"))
    template, rubric = judge_template(e)
    if e.judge == "pairwise":
        questions = [[] if x == y else  # identical responses: nothing to ask
                     [pairwise_prompt(r["prompt"], x, y, template=template, rubric=rubric),
                      pairwise_prompt(r["prompt"], y, x, template=template, rubric=rubric)]
                     for r, ((x, _), (y, _)) in zip(batch, responses)]
    else:
        questions = [[pointwise_prompt(r["prompt"], text, template=template, rubric=rubric,
                                       low=e.score_min, high=e.score_max) for text, _ in mine]
                     for r, mine in zip(batch, responses)]
    answers = _ask(s, questions, seed)
    extra: dict[str, Any] = {"judge_votes": e.judge_votes}
    if student_seeds:
        extra["student"] = {**s.student_provenance(), "seeds": student_seeds}
    kept: list[dict] = []
    rejected: list[dict] = []
    for r, mine, asked in zip(batch, responses, answers):
        texts = [t for t, _ in mine]
        row: dict[str, Any] = {"id": r["id"], "prompt": r["prompt"], "responses": texts,
                               "sources": [src for _, src in mine], "judge": e.judge}
        if e.judge == "pairwise":
            (x, _), (y, _) = mine
            verdicts = [[parse_choice(a, *shown) for a in order] for order, shown in zip(asked, ((x, y), (y, x)))]
            row["judgements"] = [{"order": order, "a": a_is, "vote": v, **verdict.as_dict()}
                                 for (order, a_is), votes in zip((("first", 0), ("swapped", 1)), verdicts)
                                 for v, verdict in enumerate(votes)]
            if not verdicts:
                winner, margin, reason = None, 0.0, "the two responses are identical"
            else:
                pref = swap_consistent(*verdicts)
                winner, margin, reason = pref.winner, pref.margin, pref.reason
            pair = None if winner is None else (winner, 1 - winner)
        else:
            verdicts = [[parse_score(a, low=e.score_min, high=e.score_max) for a in votes] for votes in asked]
            row["judgements"] = [{"response": i, "vote": v, **verdict.as_dict()}
                                 for i, votes in enumerate(verdicts) for v, verdict in enumerate(votes)]
            row["scores"] = scores = mean_scores(verdicts)
            best, worst, margin, reason = best_and_worst(scores, low=e.score_min, high=e.score_max)
            pair = None if best is None or worst is None else (best, worst)
            if sum(x is not None for x in scores) < 2:
                reason = f"{reason}: {_why_unscored(verdicts)}"
        if pair is not None:
            win, lose = pair
            row.update(chosen=texts[win], rejected=texts[lose], response=texts[win], margin=margin,
                       chosen_source=mine[win][1], rejected_source=mine[lose][1])
            if texts[win] == texts[lose]:
                reason = "chosen and rejected responses are identical"
            elif not texts[win].strip():
                reason = "empty chosen response"
        row["provenance"] = s.provenance(seed, **extra)
        keep_or_reject(row, reason, kept, rejected)
    return kept, rejected


def _why_unscored(verdicts: list[list[Verdict]]) -> str:
    """Why each response that got no score got none (its first vote's reason)."""
    return "; ".join(f"response {i}: {votes[0].reason}" for i, votes in enumerate(verdicts)
                     if all(v.value is None for v in votes))
