"""Verifiers: which of the student's own samples are good enough to train on (method ``self-improve``).

A verifier takes a list of :class:`Sample` (the prompt, the sampled response, the row's reference
response, whether the sample finished) and returns one bool per sample: accept or reject. Verifiers
are registered by name in :data:`VERIFIERS` (``method.verifier=NAME``), each with what it needs from
the teacher, checked before step 1 as a method's needs are:

- ``answer``: the exact final answer (math). The sample's final answer equals the reference's after the
  math task's normalisation (:func:`lmdistill.data.math.answer_correct`, the one evaluation scores
  ``accuracy`` with); a sample cut at ``method.max_new_tokens`` is rejected (its answer is unfinished).
  Needs no teacher.

A judge (the teacher grades each response) plugs in with :func:`register_verifier`: a factory
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
from lmdistill.teachers import Needs

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
