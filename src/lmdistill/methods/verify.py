"""Verifiers: which of the student's own samples are good enough to train on (method ``self-improve``).

A verifier takes a list of :class:`Sample` (the prompt, the sampled response, the row's reference
response, whether the sample finished) and returns one bool per sample: accept or reject. Verifiers
are registered by name in :data:`VERIFIERS` (``method.verifier=NAME``), each with what it needs from
the teacher, checked before step 1 as a method's needs are:

- ``answer``: the exact final answer (math). The sample's final answer equals the reference's after the
  math task's normalisation (:func:`lmdistill.data.math.answer_correct`, the one evaluation scores
  ``accuracy`` with); a sample cut at ``method.max_new_tokens`` is rejected (its answer is unfinished).
  Needs no teacher.

- ``judge``: the teacher grades each finished sample on a 1–10 scale (:func:`lmdistill.judging.pointwise_prompt`,
  greedy, parsed by :func:`lmdistill.judging.parse_score`, the reader ``elicit judge`` uses) and a sample
  scoring at least ``method.judge_threshold`` is kept; an unparsed answer rejects. Needs a teacher that
  generates text (any backend).

Other verifiers plug in with :func:`register_verifier`: a factory
``(method options, RunContext) -> Verifier`` (it reaches the teacher as ``ctx.teacher``) and the
:class:`~lmdistill.teachers.Needs` it has (e.g. ``Needs(Capability.TEXT)``). Its teacher's forwards
are metered like every teacher's. It must live at this layer or below (``lmdistill.methods`` may
not import ``lmdistill.elicit``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lmdistill.config import MethodConfig
from lmdistill.data.math import answer_correct
from lmdistill.judging import parse_score, pointwise_prompt
from lmdistill.teachers import Capability, Needs, Teacher

if TYPE_CHECKING:
    from lmdistill.methods.base import RunContext


@dataclass(frozen=True)
class Sample:
    """One of the student's samples, as text."""

    prompt: str
    """The prompt as the student saw it (decoded; with a chat model, its template's turn markers too)."""
    response: str
    """The sampled response, decoded without special tokens."""
    reference: str
    """The row's response (for math, the gold answer)."""
    finished: bool
    """Whether the sample ended with EOS within ``method.max_new_tokens``."""


class Verifier(Protocol):
    """Judges samples: one bool (accept) per sample, in order."""

    def accept(self, samples: Sequence[Sample]) -> list[bool]: ...


@dataclass(frozen=True)
class VerifierSpec:
    """A registered verifier: how to make it and what it needs from the teacher."""

    make: Callable[[MethodConfig, RunContext], Verifier]
    needs: Needs = Needs()
    help: str = ""


VERIFIERS: dict[str, VerifierSpec] = {}
"""Verifier name → :class:`VerifierSpec` (``method.verifier``)."""


def register_verifier(name: str, make: Callable[[MethodConfig, RunContext], Verifier], *, needs: Needs = Needs(),
                      help: str = "") -> None:
    """Make a verifier selectable as ``method.verifier=<name>``."""
    VERIFIERS[name] = VerifierSpec(make, needs, help)


class AnswerVerifier:
    """Accepts a finished sample whose final answer equals the reference's (math)."""

    def accept(self, samples: Sequence[Sample]) -> list[bool]:
        return [s.finished and answer_correct(s.response, s.reference) for s in samples]


register_verifier("answer", lambda cfg, ctx: AnswerVerifier(),
                  help="the exact final answer (math): the sample's final answer equals the reference's")


class JudgeVerifier:
    """Accepts a finished sample that the teacher scores at least `threshold` on `low`–`high` (pointwise, greedy).

    `raw` keeps the last call's answers and parsed verdicts (for inspection)."""

    def __init__(self, teacher: Teacher, threshold: float, *, low: int = 1, high: int = 10,
                 max_new_tokens: int = 16) -> None:
        self.teacher, self.threshold, self.low, self.high = teacher, threshold, low, high
        self.max_new_tokens = max_new_tokens
        self.raw: list = []

    def accept(self, samples: Sequence[Sample]) -> list[bool]:
        asked = [i for i, s in enumerate(samples) if s.finished]
        answers = self.teacher.generate([pointwise_prompt(samples[i].prompt, samples[i].response, low=self.low,
                                                          high=self.high) for i in asked],
                                        max_new_tokens=self.max_new_tokens) if asked else []
        verdicts = [parse_score(a, low=self.low, high=self.high) for a in answers]
        self.raw = verdicts
        ok = [False] * len(samples)
        for i, v in zip(asked, verdicts):
            ok[i] = v.value is not None and float(v.value) >= self.threshold
        return ok


register_verifier("judge", lambda cfg, ctx: JudgeVerifier(ctx.teacher, cfg.judge_threshold),
                  needs=Needs(Capability.TEXT),
                  help="the teacher's pointwise score (1-10) of each finished sample is at least method.judge_threshold")
