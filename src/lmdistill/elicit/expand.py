"""``expand`` (self-instruct, Wang et al. 2023): new instructions written from seed instructions.

Each round asks ``elicit.batch_size`` times for a new instruction shown ``elicit.num_demos``
seed instructions; a candidate is kept when its ROUGE-L F1 to every seed and to every
instruction kept before is below ``elicit.rouge_threshold``, then the teacher answers it.
Row: ``prompt`` (the new instruction), ``response``, ``rouge_l_max``, ``most_similar``,
``demo_ids``, ``raw``. Rounds run until ``elicit.num_instructions`` are kept (or
``elicit.max_rounds``); progress is the round count, so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Sequence
from typing import Any

from lmdistill.elicit.session import Session, batch_seed, fill, keep_or_reject
from lmdistill.elicit.store import ElicitStore

log = logging.getLogger(__name__)

_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•]|(?:new\s+)?(?:task|instruction|question)\s*(?:\d+)?\s*:)\s*",
                        re.IGNORECASE)
_LIST_ITEM = re.compile(r"^(?:\d+\s*[.)]|[-*•])\s")


def clean_instruction(text: str) -> str:
    """The first non-empty line of a reply, without list numbering, a ``Task:`` label or quotes.

    A line ending with ``:`` that introduces the next one (``Here is a new task:``) is skipped; one
    that introduces a list (``... For example:`` then ``1. ...``) is the instruction.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith(":") and i + 1 < len(lines) and not _LIST_ITEM.match(lines[i + 1]):
            continue
        line = _NUMBERING.sub("", line).strip().strip('"“”').strip()
        if line:
            return line
    return ""


class RougeL:
    """ROUGE-L F1 (rouge-score's tokenizer: lower-cased ASCII words, no stemming) of one text to a pool."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer  # imports nltk (~1 s): only when expand runs, not for `lmdistill --help`

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def __call__(self, a: str, b: str) -> float:
        """ROUGE-L F1 of two texts (symmetric)."""
        return self._scorer.score(a, b)["rougeL"].fmeasure

    def nearest(self, text: str, pool: Sequence[str]) -> tuple[float, str | None]:
        """(largest F1 to any text of `pool`, that text); (0, None) for an empty pool."""
        best, which = 0.0, None
        for other in pool:
            score = self(text, other)
            if score > best:
                best, which = score, other
        return best, which


def screen(rouge: RougeL, pool: Sequence[str], candidates: Sequence[tuple[dict, str]], threshold: float, *,
           need: int) -> tuple[list[dict], list[dict]]:
    """(accepted, rejected) candidate instructions, each a (row, the teacher's reply), until `need` are accepted.

    The reply's instruction (:func:`clean_instruction`, 3 to 150 words) becomes the row's
    ``prompt`` (the reply its ``raw``); it is accepted when its ROUGE-L F1 to every text of `pool`
    and to every candidate accepted before it is below `threshold` (``rouge_l_max``,
    ``most_similar``); a rejected row carries its ``reason``.
    """
    accepted: list[dict] = []
    rejected: list[dict] = []
    for row, out in candidates:
        if len(accepted) == need:
            break
        text = clean_instruction(out)
        row = {**row, "prompt": text, "raw": out}
        words = len(text.split())
        if not 3 <= words <= 150:
            rejected.append({**row, "reason": f"instruction of {words} words (3 to 150 kept)"})
            continue
        score, nearest = rouge.nearest(text, [*pool, *(a["prompt"] for a in accepted)])
        row.update(rouge_l_max=score, most_similar=nearest)
        if score >= threshold:
            rejected.append({**row, "reason": f"ROUGE-L {score:.3f} >= {threshold} to an existing instruction"})
        else:
            accepted.append(row)
    return accepted, rejected


def answer(s: Session, accepted: list[dict], seed: int, rejected: list[dict], **provenance: Any) -> list[dict]:
    """The accepted instructions answered by the teacher (``response``, ``provenance``); one answered
    with nothing is appended to `rejected`."""
    kept: list[dict] = []
    for row, out in zip(accepted, s.generate([a["prompt"] for a in accepted], seed)):
        row = {**row, "response": out.strip(), "provenance": s.provenance(seed, **provenance)}
        keep_or_reject(row, None if row["response"] else "empty response", kept, rejected)
    return kept


def elicit_expand(s: Session, seeds: list[dict], store: ElicitStore) -> tuple[int, int]:
    """Rounds of `batch_size` candidate instructions until `num_instructions` are kept; (kept, rejected) new."""
    e = s.e
    rouge = RougeL()
    pool = [r["prompt"] for r in seeds] + [r["prompt"] for r in store.kept_rows]
    rounds = int(store.progress.get("rounds", 0))
    max_rounds = e.max_rounds or 10 * math.ceil(e.num_instructions / e.batch_size) + 10
    new_kept = new_rejected = 0
    while len(store.kept_rows) < e.num_instructions and rounds < max_rounds:
        rng = random.Random(batch_seed(e.seed, "expand-demos", rounds))
        k = min(e.num_demos, len(seeds))
        demo_sets = [rng.sample(range(len(seeds)), k) for _ in range(e.batch_size)]
        asked = [fill(e.expand_template, "expand_template",
                      demos="\n".join(f"{j + 1}. {seeds[d]['prompt']}" for j, d in enumerate(demos)))
                 for demos in demo_sets]
        instruction_seed = batch_seed(e.seed, "expand-instructions", rounds)
        candidates = [({"id": f"expand-{rounds:05d}-{i:03d}", "demo_ids": [seeds[d]["id"] for d in demos]}, out)
                      for i, (demos, out) in enumerate(zip(demo_sets, s.generate(asked, instruction_seed)))]
        accepted, rejected = screen(rouge, pool, candidates, e.rouge_threshold,
                                    need=e.num_instructions - len(store.kept_rows))
        answer_seed = batch_seed(e.seed, "expand-answers", rounds)
        kept = answer(s, accepted, answer_seed, rejected, instruction_seed=instruction_seed)
        for row in rejected:
            row.setdefault("provenance", s.provenance(instruction_seed))
        rounds += 1
        done = len(store.kept_rows) + len(kept) >= e.num_instructions
        store.flush(kept, rejected, progress={"rounds": rounds}, complete=done)
        pool += [r["prompt"] for r in kept]
        new_kept, new_rejected = new_kept + len(kept), new_rejected + len(rejected)
        log.info("expand round %d: %d/%d instructions kept", rounds, len(store.kept_rows), e.num_instructions)
    if len(store.kept_rows) < e.num_instructions:
        log.warning("expand: stopped after %d rounds (elicit.max_rounds) with %d of %d instructions", rounds,
                    len(store.kept_rows), e.num_instructions)
    return new_kept, new_rejected
