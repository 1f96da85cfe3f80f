"""The teacher protocol: what a backend can give, and what a method may ask of it.

Capabilities nest: ``full ⊃ topk ⊃ token ⊃ text`` (DESIGN.md, "Teacher capability levels").
A backend declares the highest level it gives; every lower one is implied. Everything else a
method may need is declared too, as plain attributes every backend sets (no ``getattr`` probes):

- ``weights``: the teacher's own model here (hidden states, teacher-mixed sampling, greedy
  generation in token space), or None (a cache, a server, a mixture);
- ``prefix_ids``: token ids the teacher sees before every sequence (``teacher.prefix``);
- ``vocab_size``: the width of its distributions (None where unknown);
- ``k``: the top-k a backend holds natively (a cache's k), None where any k can be asked;
- ``tokenizer``: its own tokenizer where it has one here;
- ``sharded``: its weights are split across the run's processes (FSDP / ZeRO-3, teachers/engine.py),
  so that every forward is a collective that every process must run;
- ``shares_vocabulary``: whether its token ids are the student's (False: a teacher with another
  tokenizer, loaded for a method that hands it the text in its own tokens);
- ``modules()``: the ``nn.Module`` forwards that run here, so that the loop's FLOP meter counts
  them (2·N per token) wherever they are called from.

A method states what it needs as :class:`Needs`; :func:`check_needs` refuses, before anything is
written, a teacher that cannot give it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch
from transformers import PreTrainedTokenizerBase

from lmdistill.io import UserError
from lmdistill.losses import TopK


class Capability(IntEnum):
    """What a teacher backend gives, ordered: a higher level implies every lower one."""

    TEXT = 0
    """Generations only."""
    TOKEN = 1
    """Log-probs of given tokens (scoring a sequence)."""
    TOPK = 2
    """Top-k token ids and log-probs at every position."""
    FULL = 3
    """Logits over the whole vocabulary at every position."""

    @classmethod
    def parse(cls, name: str) -> Capability:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown teacher capability {name!r}; known: full, topk, token, text") from None

    def __str__(self) -> str:
        return self.name.lower()


class CapabilityError(UserError, ValueError):
    """A method needs more from the teacher than the backend gives."""


HOW_TO_GET = {
    Capability.FULL: "a local teacher (teacher.model.path=... a Hugging Face directory or GGUF file)",
    Capability.TOPK: "a top-k cache (`lmdistill cache-teacher`), a local teacher, or a server that returns log-probs",
    Capability.TOKEN: "a local teacher, a cache, or a server that scores prompts (echo with log-probs)",
    Capability.TEXT: "any teacher",
}


CROSS_TOKENIZER = ("for a teacher with another tokenizer use method.name=kd with method.align=uld or span (the "
                   "teacher scores the same text in its own tokens), or a sequence-level method (seqkd, dpkd), "
                   "which exchanges text")
"""How to distil from a teacher whose tokenizer is not the student's (said by every refusal of one)."""


def require(have: Capability, need: Capability, *, method: str, backend: str) -> None:
    """Stop with a message naming what is missing and how to get it, when `have` < `need`."""
    if have < need:
        raise CapabilityError(
            f"method {method!r} needs a teacher that gives {need} (teacher log-probs level), but the {backend} "
            f"teacher gives only {have}. Use {HOW_TO_GET[need]}."
        )


class Teacher:
    """A frozen teacher. Tensors are on the caller's device; nothing here carries gradients.

    Backends subclass it, set the attributes below and implement what their capability gives;
    what they do not give raises :class:`CapabilityError` (the defaults here).
    """

    capability: Capability = Capability.TEXT
    name: str = "teacher"
    weights: torch.nn.Module | None = None
    """The teacher's model here (for hidden states and teacher-mixed sampling), or None."""
    prefix_ids: list[int] = []
    """Token ids the teacher sees before every sequence and the outputs leave out (`teacher.prefix`)."""
    vocab_size: int | None = None
    """Width of the teacher's distributions (logits beyond it are padding), None where unknown."""
    k: int | None = None
    """The top-k this backend holds (a cache's); None where any k can be asked."""
    tokenizer: PreTrainedTokenizerBase | None = None
    """The teacher's own tokenizer where it has one here (a local model; a server given `teacher.model`)."""
    sharded: bool = False
    """Its weights are split across the processes (FSDP / ZeRO-3): every forward is collective."""
    shares_vocabulary: bool = True
    """Whether the teacher's token ids are the student's. False only where the loader was told the method
    re-encodes text in the teacher's tokens (``Needs.vocabulary="own"``) and the tokenizers differ."""

    def modules(self) -> list[torch.nn.Module]:
        """The models whose forwards run here (counted by the FLOP meter): a local model, a mixture's members."""
        return [self.weights] if self.weights is not None else []

    def _refuse(self, need: Capability, what: str) -> CapabilityError:
        return CapabilityError(f"the {self.name} teacher gives {self.capability}, not {what} ({need}); "
                               f"use {HOW_TO_GET[need]}")

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice | None = None) -> torch.Tensor:
        """(B, W, V) next-token logits at the positions `window` (a slice of T; None: every position, W = T)
        (FULL). input_ids, attention_mask (B, T)."""
        raise self._refuse(Capability.FULL, "full logits")

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, window: slice | None = None) -> TopK:
        """Top-k ids and log-probs (B, W, k) of the next token at the positions `window` (None: all) (TOPK)."""
        raise self._refuse(Capability.TOPK, "top-k log-probs")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log-prob of each token given its prefix; position 0 and padding are 0 (TOKEN)."""
        raise self._refuse(Capability.TOKEN, "token log-probs")

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
                 seed: int | None = None) -> list[str]:
        """Responses to prompts (rendered with the teacher's own template, after `system_prompt`) (TEXT).

        `seed` makes sampling reproducible where the backend can (a local model, a server that takes one).
        """
        raise self._refuse(Capability.TEXT, "generations")


@dataclass(frozen=True)
class Needs:
    """What a method needs from its teacher, checked before the first step (:func:`check_needs`)."""

    capability: Capability | None = None
    """Least capability (None: no teacher at all)."""
    weights: str = ""
    """Non-empty: the teacher's model must be here, for what this says (e.g. "its hidden states")."""
    no_prefix: str = ""
    """Non-empty: a teacher with `teacher.prefix` is refused, for the reason this says."""
    generates: bool = False
    """The method generates with the teacher's model (what `weights` says): a teacher sharded across the
    processes is refused, since each process decodes its own number of steps and every forward of a
    sharded model is a collective that all of them must run."""
    vocabulary: str = "shared"
    """Which token ids the method hands the teacher. `shared`: the student's (token-level methods compare
    distributions id by id), so the teacher's tokenizer must be the student's. `own`: the same text in the
    teacher's own tokens (kd with method.align), whatever its tokenizer, which must be here. `any`: the
    student's ids to a teacher that shares them, else text re-encoded in its own tokens (sequence-level
    methods: seqkd and dpkd generate and score texts). Methods that need no teacher at all (seqkd with
    method.source=data on rows labelled by `lmdistill elicit`) exchange only text."""

    def __post_init__(self) -> None:
        if self.vocabulary not in ("shared", "own", "any"):
            raise ValueError(f"Needs.vocabulary must be 'shared', 'own' or 'any', got {self.vocabulary!r}")

    def teacher_tokens(self, teacher: Teacher | None) -> bool:
        """Whether the rows must also be encoded in `teacher`'s own tokens (its tokenizer is then here)."""
        return teacher is not None and (self.vocabulary == "own"
                                        or (self.vocabulary == "any" and not teacher.shares_vocabulary))


def check_needs(method: str, needs: Needs, teacher: Teacher | None, *, sharded: bool = False) -> None:
    """Refuse, with a message naming what is missing and how to get it, a teacher that cannot meet `needs`.

    `sharded`: the run's engine will shard the teacher's models across the processes (teachers/engine.py)."""
    if needs.capability is None:
        return
    weights = f" and its weights here ({needs.weights})" if needs.weights else ""
    if teacher is None:
        raise CapabilityError(
            f"method {method!r} needs a teacher that gives {needs.capability}{weights}; set teacher.kind=local and "
            "teacher.model.path=... (a Hugging Face directory, a GGUF file)"
        )
    require(teacher.capability, needs.capability, method=method, backend=teacher.name)
    if needs.vocabulary == "shared" and not teacher.shares_vocabulary:
        raise CapabilityError(f"method {method!r} hands the teacher the student's token ids, but the {teacher.name} "
                              f"teacher has another tokenizer; {CROSS_TOKENIZER}")
    if needs.teacher_tokens(teacher) and teacher.tokenizer is None:
        raise CapabilityError(f"method {method!r} re-encodes the text with the teacher's own tokenizer, but the "
                              f"{teacher.name} teacher has none here; use a local teacher (teacher.kind=local)")
    if needs.weights and teacher.weights is None:
        raise CapabilityError(f"method {method!r} needs the teacher's weights here ({needs.weights}), but the "
                              f"{teacher.name} teacher has no weights here; use a local teacher (teacher.kind=local)")
    if needs.generates and (sharded or teacher.sharded) and teacher.weights is not None:
        raise CapabilityError(f"method {method!r} generates with the teacher's model ({needs.weights}), but under "
                              "FSDP / ZeRO-3 the teacher is sharded across the processes, and a generation loop runs "
                              "a different number of forwards on each; launch with DDP (the teacher whole on every "
                              "process, or on teacher.device)")
    if needs.no_prefix and teacher.prefix_ids:
        raise CapabilityError(f"method {method!r}: {needs.no_prefix}; leave teacher.prefix empty")
