"""The teacher protocol: what a backend can give, and what a method may ask of it.

Capabilities nest: ``full ⊃ topk ⊃ token ⊃ text`` (DESIGN.md, "Teacher capability levels").
A backend declares the highest level it gives; every lower one is implied.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Protocol, runtime_checkable

import torch

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


class CapabilityError(ValueError):
    """A method needs more from the teacher than the backend gives."""


HOW_TO_GET = {
    Capability.FULL: "a local teacher (teacher.model.path=... a Hugging Face directory or GGUF file)",
    Capability.TOPK: "a top-k cache (`lmdistill cache-teacher`), a local teacher, or a server that returns log-probs",
    Capability.TOKEN: "a local teacher, a cache, or a server that scores prompts (echo with log-probs)",
    Capability.TEXT: "any teacher",
}


def require(have: Capability, need: Capability, *, method: str, backend: str) -> None:
    """Stop with a message naming what is missing and how to get it, when `have` < `need`."""
    if have < need:
        raise CapabilityError(
            f"method {method!r} needs a teacher that gives {need} (teacher log-probs level), but the {backend} "
            f"teacher gives only {have}. Use {HOW_TO_GET[need]}."
        )


@runtime_checkable
class Teacher(Protocol):
    """A frozen teacher. Tensors are on the caller's device; nothing here carries gradients."""

    capability: Capability
    name: str

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits at every position (FULL)."""
        ...

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> TopK:
        """Top-k ids and log-probs (B, T, k) of the next token at every position (TOPK)."""
        ...

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log-prob of each token given its prefix; position 0 and padding are 0 (TOKEN)."""
        ...

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Responses to prompts (rendered with the teacher's own template) (TEXT)."""
        ...
