"""Pure answer metrics: text overlap, exact match, final answers, length buckets.

No model is run here; everything takes strings, so each metric is tested against values worked
out by hand (tests/test_evaluate.py). Teacher-forced statistics (cross-entropy, calibration) are
in :mod:`lmdistill.heldout`, divergences to a teacher in :mod:`lmdistill.evaluate.divergence`.

- ROUGE-L: the F-measure of the longest common subsequence of words, from the ``rouge-score``
  package with its default tokenizer (lower-case, alphanumeric words) and Porter stemming, as in
  the Super-NaturalInstructions / MiniLLM / DPKD evaluation scripts.
- Exact match: equality after SQuAD's normalisation (lower-case, no punctuation, no articles,
  single spaces), as in the same scripts.
- Answer accuracy: equality of the *final answer* after the math task's normalisation
  (:func:`lmdistill.data.math.answer_correct`, below the methods, which verify answers with it too).
- Length buckets (DPKD, Sec. 4.6): references of length <= median, median < length <= mean,
  and > max(median, mean).
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import string
from collections.abc import Sequence
from dataclasses import dataclass

from lmdistill.data.math import answer_correct, final_answer  # noqa: F401  (re-exported: answer metrics)
from lmdistill.heldout import TokenStats  # noqa: F401  (until train.py imports it from lmdistill.heldout)

BUCKET_NAMES = ("<= median", "median-mean", "> mean")

# --------------------------------------------------------------------------- text metrics


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] between two texts (word LCS; 0 when either has no words)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER_MARKS = re.compile(r"(?<![\w.])-(?=\d)|(?<=\d)[./](?=\d)")
"""Punctuation that is part of a number: a minus sign, a decimal point or fraction bar between digits."""


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower-case, punctuation removed, articles removed, whitespace collapsed; except
    that a number keeps its minus sign and decimal point (SQuAD's would make "-25.6" equal "256")."""
    keep = {m.start() for m in _NUMBER_MARKS.finditer(text)}
    text = "".join(c for i, c in enumerate(text.lower()) if i in keep or c not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the two texts are equal after :func:`normalize_text`."""
    return normalize_text(prediction) == normalize_text(reference)


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-example ``rouge_l``, ``exact_match`` and ``accuracy`` (each 0/1 or in [0, 1])."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return {
        "rouge_l": [rouge_l(p, r) for p, r in zip(predictions, references)],
        "exact_match": [float(exact_match(p, r)) for p, r in zip(predictions, references)],
        "accuracy": [float(answer_correct(p, r)) for p, r in zip(predictions, references)],
    }


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence (a bucket with no example has no score)."""
    return sum(values) / len(values) if values else math.nan


# --------------------------------------------------------------------------- length buckets


def text_length(text: str, unit: str) -> int:
    """Length of a reference in `unit`: ``chars`` (of the stripped text) or ``words`` (whitespace-separated)."""
    if unit == "chars":
        return len(text.strip())
    if unit == "words":
        return len(text.split())
    raise ValueError(f"unknown length unit {unit!r}; known: chars, words")


@dataclass
class LengthBuckets:
    """Reference lengths split at their median and mean (DPKD's three subsets).

    bucket[i] is 0 for length <= median, 1 for median < length <= mean, 2 for length > max(median, mean)
    (when the mean is below the median, bucket 1 is empty).
    """

    median: float
    mean: float
    bucket: list[int]

    @classmethod
    def of(cls, lengths: Sequence[float]) -> LengthBuckets:
        if not lengths:
            return cls(math.nan, math.nan, [])
        med, avg = float(statistics.median(lengths)), float(statistics.fmean(lengths))
        return cls(med, avg, [0 if n <= med else 1 if n <= avg else 2 for n in lengths])

    def summarize(self, scores: dict[str, Sequence[float]]) -> list[dict]:
        """Per bucket: its name, bounds, number of examples and the mean of each score."""
        out = []
        for b, name in enumerate(BUCKET_NAMES):
            idx = [i for i, x in enumerate(self.bucket) if x == b]
            row: dict = {"bucket": name, "n": len(idx)}
            for key, values in scores.items():
                row[key] = mean([values[i] for i in idx])
            out.append(row)
        return out
