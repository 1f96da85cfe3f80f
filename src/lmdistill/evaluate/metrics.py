"""Pure evaluation metrics: text overlap, answers, length buckets, calibration, divergence to a teacher.

No model is run here; everything takes strings or tensors, so each metric is tested against
values worked out by hand (tests/test_evaluate.py).

- ROUGE-L: the F-measure of the longest common subsequence of words, from the ``rouge-score``
  package with its default tokenizer (lower-case, alphanumeric words) and Porter stemming, as in
  the Super-NaturalInstructions / MiniLLM / DPKD evaluation scripts.
- Exact match: equality after SQuAD's normalisation (lower-case, no punctuation, no articles,
  single spaces), as in the same scripts.
- Answer accuracy: equality of the *final answer* (:func:`final_answer`) after the math task's
  normalisation (:func:`lmdistill.data.math.normalize_answer`).
- Length buckets (DPKD, Sec. 4.6): references of length <= median, median < length <= mean,
  and > max(median, mean).
- Expected calibration error (Guo et al. 2017): equal-width bins ((m-1)/M, m/M] of the
  next-token confidence; ECE = sum_m n_m / N * |accuracy_m - confidence_m|.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.data.tokenize import IGNORE_INDEX

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


_ANSWER_MARKER = re.compile(r"####|answer is|answer:", re.IGNORECASE)


def final_answer(text: str) -> str:
    """The final answer of a response: the first line after the last answer marker
    (``####``, ``answer is``, ``answer:``, any case), else the last non-empty line."""
    parts = _ANSWER_MARKER.split(text)
    if len(parts) > 1:
        lines = [line for line in parts[-1].splitlines() if line.strip()]
        return lines[0].strip() if lines else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def answer_correct(prediction: str, reference: str) -> bool:
    """Whether the final answers agree after the math task's normalisation."""
    from lmdistill.data.math import normalize_answer

    return normalize_answer(final_answer(prediction)) == normalize_answer(final_answer(reference))


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


# --------------------------------------------------------------------------- calibration


def calibration_bins(confidence: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """Per-bin (count, summed confidence, summed correctness) for the ECE.

    confidence: (N,) float in [0, 1], the probability of the predicted (arg-max) token.
    correct: (N,) bool, whether that token is the reference one.
    Returns (n_bins, 3) float64; bin m holds confidences in ((m-1)/M, m/M], the first also 0.
    """
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} must be equal (N,)")
    conf = confidence.detach().double()
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    out = torch.zeros(n_bins, 3, dtype=torch.float64, device=conf.device)
    out[:, 0].index_add_(0, idx, torch.ones_like(conf))
    out[:, 1].index_add_(0, idx, conf)
    out[:, 2].index_add_(0, idx, correct.double())
    return out.cpu()


def expected_calibration_error(bins: Tensor) -> float:
    """ECE = Σ_m n_m/N · |acc_m − conf_m| from :func:`calibration_bins`' (n_bins, 3) sums; NaN for N = 0."""
    count, conf, correct = bins[:, 0], bins[:, 1], bins[:, 2]
    total = float(count.sum())
    if total == 0:
        return math.nan
    return float((correct - conf).abs().sum() / total)  # n_m·|acc_m − conf_m| = |Σ correct − Σ conf|


@dataclass
class TokenStats:
    """Sums over held-out response tokens, added over batches and processes before taking means."""

    ce: float
    """Summed cross-entropy, nats."""
    tokens: int
    """Number of scored tokens."""
    correct: int
    """Tokens whose arg-max prediction is the reference token."""
    bins: Tensor
    """(n_bins, 3) calibration sums (see :func:`calibration_bins`)."""

    @classmethod
    def zeros(cls, n_bins: int) -> TokenStats:
        return cls(0.0, 0, 0, torch.zeros(n_bins, 3, dtype=torch.float64))

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(self.ce + other.ce, self.tokens + other.tokens, self.correct + other.correct,
                          self.bins + other.bins)

    def to_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """Flat float64 vector (for a cross-process sum)."""
        head = torch.tensor([self.ce, self.tokens, self.correct], dtype=torch.float64)
        return torch.cat([head, self.bins.flatten()]).to(device)

    @classmethod
    def from_tensor(cls, flat: Tensor) -> TokenStats:
        flat = flat.detach().double().cpu()
        return cls(float(flat[0]), int(round(float(flat[1]))), int(round(float(flat[2]))), flat[3:].view(-1, 3).clone())

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Mean cross-entropy per token, next-token accuracy and ECE (NaN when no token was scored)."""
        n = self.tokens
        return {
            f"{prefix}ce": self.ce / n if n else math.nan,
            f"{prefix}token_acc": self.correct / n if n else math.nan,
            f"{prefix}ece": expected_calibration_error(self.bins),
        }


def token_stats(logits: Tensor, labels: Tensor, *, n_bins: int = 10, chunk: int = 4096) -> TokenStats:
    """Cross-entropy, arg-max correctness and calibration sums over the response tokens of a batch.

    logits (B, T, V); labels (B, T) with ``IGNORE_INDEX`` on prompt and padding; position t
    predicts token t + 1. Only the scored positions are taken out, then handled `chunk` rows at a
    time in float32, so no (B, T, V) float32 copy is made.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + (V,)")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    scored = logits[:, :-1][mask]  # (N, V)
    tgt = targets[mask]  # (N,)
    out = TokenStats.zeros(n_bins)
    for a in range(0, tgt.numel(), chunk):
        logp = torch.log_softmax(scored[a : a + chunk].float(), dim=-1)  # (C, V)
        t = tgt[a : a + chunk]
        top_logp, top_id = logp.max(dim=-1)
        correct = top_id == t
        out = out + TokenStats(
            ce=-float(logp.gather(-1, t[:, None]).sum()),
            tokens=int(t.numel()),
            correct=int(correct.sum()),
            bins=calibration_bins(top_logp.exp(), correct, n_bins),
        )
    return out


# --------------------------------------------------------------------------- divergence to the teacher


def first_response_mask(labels: Tensor) -> Tensor:
    """(B, T) bool: the position predicting each row's first response token (none for a row without one)."""
    from lmdistill.methods.common import prediction_mask

    pred = prediction_mask(labels)
    first = torch.zeros_like(pred)
    has = pred.any(dim=1)
    idx = pred.long().argmax(dim=1)
    first[has.nonzero().squeeze(1), idx[has]] = True
    return first


def divergence_sums(student_logits: Tensor, teacher, labels: Tensor) -> dict[str, float]:
    """Summed forward / reverse KL to the teacher at response positions (all, and the first of each row).

    student_logits (B, T, V); teacher (B, T, V) logits or ``TopK``; labels (B, T) as in training.
    Forward KL is KL(teacher ‖ student), reverse KL is KL(student ‖ teacher) (``lmdistill.losses``).
    Returns sums and counts: fkl_all, rkl_all, n_all, fkl_first, rkl_first, n_first.
    """
    from lmdistill.losses import fkl, rkl
    from lmdistill.methods.common import prediction_mask

    every, first = prediction_mask(labels), first_response_mask(labels)
    out = {}
    for name, mask in (("all", every), ("first", first)):
        out[f"fkl_{name}"] = float(fkl(student_logits, teacher, mask, reduction="sum"))
        out[f"rkl_{name}"] = float(rkl(student_logits, teacher, mask, reduction="sum"))
        out[f"n_{name}"] = int(mask.sum())
    return out
