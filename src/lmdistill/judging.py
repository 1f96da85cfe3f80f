"""The teacher as a judge (seed 001's *feedback*): the prompts, and robust parsing of its answers.

Pure functions on text, so that whatever asks a teacher to judge shares them: ``lmdistill elicit
judge`` (preference pairs with margins) and a method that needs a verifier. Nothing here calls a
model; the caller asks its teacher and hands the replies in.

- :func:`pointwise_prompt` / :func:`parse_score`: a score on a rubric (``Score: 7``, ``8/10``,
  ``seven out of ten``, ``**9**``);
- :func:`pairwise_prompt` / :func:`parse_choice`: A or B (``Answer: B``, ``(A)``, ``[[B]]``,
  ``Response A is better``, ``the second one``);
- :func:`swap_consistent`: a pair asked in both orders, so that position bias cancels: the winner
  must win in both, else the pair is refused with the reason;
- :func:`best_and_worst`: the pair (highest, lowest score) of pointwise scores, with its margin.

Every parse returns a :class:`Verdict`: the value, or None and the reason (a refusal, a tie, no
answer found, a score off the scale), and the raw answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

RUBRIC = "Judge whether it is correct, helpful and clear."
"""The default criteria (``{rubric}`` in the templates)."""

POINTWISE_TEMPLATE = (
    "Rate the response to the instruction below on a scale of {low} to {high}. {rubric} "
    "{low} means useless or wrong, {high} means correct, complete and clear.\n\n"
    "Instruction:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Reply with the score only, in the form 'Score: <number>'."
)
"""Pointwise request; slots ``{prompt}``, ``{response}``, ``{rubric}``, ``{low}``, ``{high}``."""

PAIRWISE_TEMPLATE = (
    "Which response answers the instruction better? {rubric}\n\n"
    "Instruction:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Reply with 'Answer: A' or 'Answer: B' only."
)
"""Pairwise request; slots ``{prompt}``, ``{a}``, ``{b}``, ``{rubric}``."""


@dataclass(frozen=True)
class Verdict:
    """One judge answer, parsed: `value` (a score, or ``"A"`` / ``"B"``), or None and the `reason`."""

    value: float | str | None
    reason: str | None
    raw: str

    def as_dict(self) -> dict:
        """JSON-ready: ``raw``, ``value``, ``reason``."""
        return {"raw": self.raw, "value": self.value, "reason": self.reason}


def pointwise_prompt(prompt: str, response: str, *, template: str = POINTWISE_TEMPLATE, rubric: str = RUBRIC,
                     low: int = 1, high: int = 10) -> str:
    """The request to score `response` to `prompt` from `low` to `high` (KeyError on an unknown slot)."""
    return template.format(prompt=prompt, response=response, rubric=rubric, low=low, high=high)


def pairwise_prompt(prompt: str, a: str, b: str, *, template: str = PAIRWISE_TEMPLATE, rubric: str = RUBRIC) -> str:
    """The request to choose between response `a` (shown as A) and `b` (as B) to `prompt`."""
    return template.format(prompt=prompt, a=a, b=b, rubric=rubric)


# --------------------------------------------------------------------------- parsing

_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_WORD = "|".join(sorted(_WORDS, key=len, reverse=True))
_NUM = r"(\d+(?:\.\d+)?|(?i:" + _WORD + r"))\b"
_OVER = r"(?:\s*(?:/|(?i:out\s+of))\s*" + _NUM + r")?"  # an optional denominator: 8/10, seven out of ten
_LABELLED_SCORE = re.compile(
    r"(?i:\b(?:score[sd]?|rating|grade|rate[sd]?|give|giving)\b(?:\s+(?:it|this|the|response|answer|as|at|an?|is|of|"
    r"would\s+be))*\s*[:=\-]?\s*)\(?" + _NUM + _OVER + r"(?!\s*(?:to|-|–)\s*\d)")
_FRACTION = re.compile(_NUM + r"\s*(?:/|(?i:out\s+of))\s*" + _NUM)
_LEADING_NUMBER = re.compile(r"^\W*(?!1\s*[.)]\s)(\d+(?:\.\d+)?)\b(?!\s*[-+*/x×=]\s*\d)")  # not a sum, not a list's "1. "
_ONLY_WORD = re.compile(r"^\W*(?i:(" + _WORD + r"))\W*$")
_REFUSAL = re.compile(
    r"(?i)\bI(?:'m|’m|\s+am)\s+(?:sorry|unable|not\s+able)|\bI\s+(?:can\s*not|cannot|can't|can’t|won't|do\s+not\s+feel|"
    r"don't\s+feel)\b|\bas\s+an\s+AI\b|\b(?:unable|not\s+(?:possible|able))\s+to\s+(?:evaluate|judge|rate|determine|"
    r"compare|decide|assess)")
_TIE = re.compile(r"(?i)\b(?:tie|equally\s+(?:good|bad|helpful|correct|well)|both\s+(?:are|responses\s+are)"
                  r"\s+(?:equally|the\s+same|good|correct|bad|wrong)|neither|same\s+quality|no\s+difference)\b")
_LETTER = r"(?<![A-Za-z0-9])[\(\[]{0,2}([AB])[\)\]]{0,2}(?![A-Za-z0-9])"  # a capital A or B, not inside a word
_NOUN = r"(?i:response|output|assistant|option|answer|candidate)"
_EITHER = re.compile(r"(?<![A-Za-z0-9])'?(?:(?i:answer)\s*:\s*)?\(?A\)?'?\s+(?i:or)\s+'?(?:(?i:answer)\s*:\s*)?\(?B\)?'?")  # the request echoed
_LABELLED_CHOICE = re.compile(
    r"(?i:\b(?:answer|verdict|choice|winner|decision|prefer|preferred|preference|choose|chose|pick|select)\b"
    r"|\bbetter(?:\s+(?:response|one|answer|output))?(?:\s+is)?)"
    r"\s*[:=\-]?\s*(?:(?i:is|would\s+be|the)\s+)*(?:" + _NOUN + r"\s*)?" + _LETTER)
_WINS = re.compile(r"(?:" + _NOUN + r"\s*)?" + _LETTER + r"\s+(?i:is\s+(?:better|superior|preferred|clearer|correct|"
                   r"the\s+(?:better|best|winner|correct)(?:\s+one)?)\b|wins\b|was\s+better\b)")
_LOSES = re.compile(r"(?:" + _NOUN + r"\s*)?" + _LETTER + r"\s+(?i:is\s+(?:worse|wrong|incorrect|less)\b|loses\b)")
_WHOLE = re.compile(r"^\W*(?:" + _NOUN + r"\s*)?[\(\[]{0,2}([AB])[\)\]]{0,2}\W*$")
_LEADING = re.compile(r"^\s*(?:\(([AB])\)|\[\[?([AB])\]\]?|([AB])(?=$|[.:,)\n]|\s+(?:is|wins)\b))")
_MENTION = re.compile(_NOUN + r"\s*" + _LETTER + r"|\(([AB])\)|\[\[([AB])\]\]")
_ORDINAL = re.compile(r"(?i)\bthe\s+(first|second)\s+(?:response|one|answer|output)\b")


def _number(token: str) -> float:
    word = token.lower()
    return float(_WORDS[word]) if word in _WORDS else float(token)


def _plain(text: str) -> str:
    """The answer without markdown emphasis, headings and code marks."""
    return re.sub(r"[*_`#]+", "", text).strip()


def _refusal(text: str) -> str | None:
    m = _REFUSAL.search(text)
    return f"the judge refused ({m.group(0)!r}...)" if m else None


def parse_score(raw: str, *, low: float = 1, high: float = 10) -> Verdict:
    """The score a judge gave, on the scale `low` to `high`.

    Tried in order: a labelled score (``Score: 7``, ``I would rate it an 8``, ``Rating: **9**/10``;
    the last one wins; not the scale in ``a score of 1 to 10``), a fraction (``8/10``, ``seven out
    of ten``), a reply that starts with a number (``8. The response ...``; not ``2 + 2 = 4``, not
    the ``1. `` of a numbered list, which small judges write instead of a score) or
    is one number word (``Eight.``). Numbers may be words (zero to twenty). Refused: a refusal, no
    number, a score off the scale, a fraction on another scale (``4/5`` when `high` is 10).
    """
    text = _plain(raw)
    found: tuple[str, str] | None = None
    if labelled := _LABELLED_SCORE.findall(text):
        found = labelled[-1]
    elif fractions := _FRACTION.findall(text):
        on_scale = [f for f in fractions if _number(f[1]) == high]
        found = on_scale[-1] if on_scale else fractions[-1]
    elif reason := _refusal(text):
        return Verdict(None, reason, raw)
    elif m := _LEADING_NUMBER.match(text) or _ONLY_WORD.match(text):
        found = (m.group(1), "")
    if found is None:
        return Verdict(None, "no score found in the answer" if text else "empty answer", raw)
    value = _number(found[0])
    if found[1] and _number(found[1]) != high:
        return Verdict(None, f"score {found[0]}/{found[1]} is not on the {low:g} to {high:g} scale", raw)
    if not low <= value <= high:
        return Verdict(None, f"score {value:g} is outside {low:g} to {high:g}", raw)
    return Verdict(value, None, raw)


def parse_choice(raw: str, a: str | None = None, b: str | None = None) -> Verdict:
    """The response a judge chose, ``"A"`` or ``"B"``.

    Tried in order: a labelled choice (``Answer: B``, ``I prefer Response A``, ``The better one is
    (B)``, ``[[A]]`` after ``verdict:``), the last one wins; a verdict on one response (``Response B
    is better``, ``A wins``, ``B is wrong`` → A), the last one wins; a reply that is only a letter
    (``B``, ``(A)``, ``Response A.``); then, unless the judge refused or called a tie, a reply that
    starts with the letter (``B. Because ...``; not the article of ``A good answer ...``) or names
    one response only (``Response A``, ``(B)``, ``the first one``); last, given the responses `a`
    and `b`, a reply that quotes one of them and not the other (``The answer is 112.`` when B is
    ``112``: small judges name the content, not the letter). Letters are capitals; the request's own
    ``'Answer: A' or 'Answer: B'``, echoed, is ignored. Refused: a refusal, a tie, both letters
    named, none.
    """
    text = _EITHER.sub(" ", _plain(raw))
    if labelled := [m.group(1) for m in _LABELLED_CHOICE.finditer(text)]:
        return Verdict(labelled[-1], None, raw)
    verdicts = [(m.start(), m.group(1)) for m in _WINS.finditer(text)]
    verdicts += [(m.start(), "B" if m.group(1) == "A" else "A") for m in _LOSES.finditer(text)]
    if verdicts:
        return Verdict(max(verdicts)[1], None, raw)
    if m := _WHOLE.match(text):
        return Verdict(m.group(1), None, raw)
    if reason := _refusal(text):
        return Verdict(None, reason, raw)
    if _TIE.search(text):
        return Verdict(None, "the judge called a tie", raw)
    if m := _LEADING.match(text):
        return Verdict(next(g for g in m.groups() if g), None, raw)
    named = {g for m in _MENTION.finditer(text) for g in m.groups() if g}
    named |= {"A" if m.group(1).lower() == "first" else "B" for m in _ORDINAL.finditer(text)}
    if len(named) == 1:
        return Verdict(named.pop(), None, raw)
    if named:
        return Verdict(None, "the answer names both A and B without choosing", raw)
    quoted = [letter for letter, response in (("A", a), ("B", b)) if response and _quotes(raw, response)]
    if len(quoted) == 1:
        return Verdict(quoted[0], None, raw)
    return Verdict(None, "no choice (A or B) found in the answer" if _plain(raw) else "empty answer", raw)


def _quotes(answer: str, response: str) -> bool:
    """`response` (stripped) stands in `answer` as a whole: not inside a longer word or number."""
    return re.search(r"(?<![\w.])" + re.escape(response.strip()) + r"(?![\w]|\.\d)", answer) is not None


# --------------------------------------------------------------------------- from verdicts to a preference


class Preference(NamedTuple):
    """Which of two responses won, by how much, or why no preference was drawn."""

    winner: int | None
    """0 or 1; None when refused."""
    margin: float
    """In (0, 1]; 0 when refused."""
    reason: str | None


def swap_consistent(first: Sequence[Verdict], second: Sequence[Verdict]) -> Preference:
    """The preference between responses x and y from both orders of a pairwise question.

    `first`: the judge's answers with x shown as A and y as B; `second`: with y as A and x as B
    (one answer per vote). In each order the majority of the parsed votes picks a response; the
    pair is kept only when both orders pick the same one, so that a judge that prefers a position
    (always "A") gives no pair. The margin is (votes for the winner − votes against) / votes
    parsed, over both orders: 1 when every vote agrees.
    """
    votes: list[list[int]] = []
    for name, answers, x_is in (("first", first, "A"), ("swapped", second, "B")):
        parsed = [0 if v.value == x_is else 1 for v in answers if v.value in ("A", "B")]
        if not parsed:
            why = next((v.reason for v in answers if v.reason), "no answer")
            return Preference(None, 0.0, f"{name} order: {why}")
        if 2 * sum(parsed) == len(parsed):
            return Preference(None, 0.0, f"{name} order: the votes split evenly")
        votes.append(parsed)
    picks = [int(2 * sum(v) > len(v)) for v in votes]  # 0: x, 1: y
    if picks[0] != picks[1]:
        position = "A" if picks[0] == 0 else "B"  # x was A in the first order; the winner of the second sat at A too
        return Preference(None, 0.0, f"inconsistent across orders: the judge chose {position} in both orders "
                                     "(position bias)")
    winner = picks[0]
    every = votes[0] + votes[1]
    margin = (sum(1 for v in every if v == winner) - sum(1 for v in every if v != winner)) / len(every)
    return Preference(winner, margin, None)


def mean_scores(votes: Sequence[Sequence[Verdict]]) -> list[float | None]:
    """The mean parsed score of each response over its votes (None where none parsed)."""
    out: list[float | None] = []
    for answers in votes:
        values = [float(v.value) for v in answers if isinstance(v.value, (int, float))]
        out.append(sum(values) / len(values) if values else None)
    return out


def best_and_worst(scores: Sequence[float | None], *, low: float = 1, high: float = 10
                   ) -> tuple[int | None, int | None, float, str | None]:
    """(chosen, rejected, margin, reason) from pointwise scores of several responses.

    Chosen: the highest score (the first on a tie), rejected: the lowest (the last on a tie);
    margin: their difference over the scale's width, in (0, 1]. Refused: fewer than two scored
    responses, or every score equal.
    """
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None, None, 0.0, f"{len(scored)} of {len(scores)} responses got a score (2 needed)"
    best = max(scored, key=lambda t: (t[0], -t[1]))
    worst = min(scored, key=lambda t: (t[0], -t[1]))
    if best[0] == worst[0]:
        return None, None, 0.0, f"tie: every response scored {best[0]:g}"
    return best[1], worst[1], (best[0] - worst[0]) / (high - low), None
