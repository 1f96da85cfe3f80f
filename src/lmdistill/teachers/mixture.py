"""Several teachers as one: the weighted mixture of their next-token distributions, p_mix = Σ_i w_i p_i.

A :class:`MixtureTeacher` is a teacher like any other, so ``kd`` and ``gkd`` (or any method that
reads distributions or scores) distil from the mixture unchanged. Everything is computed in log
space, ``log p_mix = logsumexp_i(log w_i + log p_i)``; a member of weight 0 contributes exactly
nothing (its ``log w = −inf``).

- ``logits``: ``log p_mix`` over the vocabulary (every member must give full logits). These are
  normalised log-probabilities, valid as logits: ``log_softmax`` leaves them unchanged. A
  temperature τ ≠ 1 in a method then tempers the *mixture*, not each member.
- ``topk``: the k most likely tokens of p_mix. Exact when every member gives full logits. With a
  top-k-only member (a cache, a server) the candidates are the union of the members' top-k ids,
  and a member's probability of a candidate outside its own top-k is taken as 0 (its tail mass
  is unknown token by token), so those log-probs are lower bounds; the loss's tail bucket keeps
  the result a proper distribution.
- ``score``: ``log p_mix`` of the given tokens, exact for members that score.
- ``generate``: not defined for a mixture (CapabilityError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lmdistill.config import ConfigError, ModelConfig, TeacherConfig
from lmdistill.losses import TopK
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers.base import Capability, CapabilityError, Teacher
from lmdistill.teachers.local import LocalTeacher, TokenizerMismatch, check_tokenizers


class MixtureTeacher(Teacher):
    """The weighted mixture of `members`' next-token distributions; weights are normalised to sum to 1."""

    def __init__(self, members: Sequence[Teacher], weights: Sequence[float], *, name: str | None = None) -> None:
        if not members or len(members) != len(weights):
            raise ValueError(
                f"a mixture needs one weight per teacher, got {len(members)} teachers and {len(weights)} weights"
            )
        if any(not w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
        total = float(sum(weights))
        self.members = list(members)
        self.mix_weights = [float(w) / total for w in weights]
        """w_i, normalised to sum to 1."""
        self.capability = min(min(m.capability for m in self.members), Capability.FULL)
        self.name = name or "mixture(" + ", ".join(f"{w:.3g}·{m.name}" for w, m in zip(self.mix_weights, members)) + ")"
        widths = {m.vocab_size for m in self.members} - {None}
        self.vocab_size = widths.pop() if len(widths) == 1 else None
        ks = {m.k for m in self.members} - {None}
        self.k = min(ks) if ks else None

    @property
    def sharded(self) -> bool:  # type: ignore[override]
        """Whether any member's model is sharded across the processes."""
        return any(m.sharded for m in self.members)

    def modules(self) -> list[torch.nn.Module]:
        """Every member's models: a mixture forward runs them all."""
        return [module for m in self.members for module in m.modules()]

    def _log_weights(self) -> list[float]:
        return [math.log(w) if w > 0 else -math.inf for w in self.mix_weights]

    def _need(self, need: Capability, what: str) -> None:
        if self.capability < need:
            weakest = min(self.members, key=lambda m: m.capability)
            raise CapabilityError(
                f"{what} of a teacher mixture need every member to give {need}, but {weakest.name} gives only "
                f"{weakest.capability}"
            )

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice | None = None) -> torch.Tensor:
        """(B, W, V) float32 log p_mix at the positions `window` (None: every position; normalised: valid as logits)."""
        self._need(Capability.FULL, "full logits")
        out: torch.Tensor | None = None
        for log_w, member in zip(self._log_weights(), self.members):
            logp = torch.log_softmax(member.logits(input_ids, attention_mask, window).float(), dim=-1) + log_w
            if out is not None and logp.shape != out.shape:
                raise ValueError(f"mixture members give logits of shapes {tuple(out.shape)} and {tuple(logp.shape)}")
            out = logp if out is None else torch.logaddexp(out, logp)
        assert out is not None
        return out

    @torch.no_grad()
    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, window: slice | None = None) -> TopK:
        """The k most likely next tokens of p_mix and their log-probs, (B, W, k) each, most likely first, at the
        positions `window` (None: all)."""
        self._need(Capability.TOPK, "top-k log-probs")
        if self.capability >= Capability.FULL:
            values, ids = self.logits(input_ids, attention_mask, window).topk(k, dim=-1)
            return TopK(ids=ids, logprobs=values)
        # Candidates: the union of the members' top-k ids; a full member is read exactly at every candidate.
        signals: list[torch.Tensor | TopK] = []
        for member in self.members:
            if member.capability >= Capability.FULL:
                signals.append(torch.log_softmax(member.logits(input_ids, attention_mask, window).float(), dim=-1))
            else:
                top = member.topk(input_ids, attention_mask, k, window)
                signals.append(TopK(ids=top.ids.long(), logprobs=top.logprobs.float()))
        union = torch.cat([s.topk(k, dim=-1).indices if isinstance(s, torch.Tensor) else s.ids for s in signals], -1)
        mix: torch.Tensor | None = None  # (B, T, U) log p_mix at the candidates, duplicates included
        for log_w, s in zip(self._log_weights(), signals):
            if isinstance(s, torch.Tensor):
                logp = s.gather(-1, union)
            else:  # log p_i(candidate): its own log-prob where listed, else −inf (probability 0)
                hit = union.unsqueeze(-1) == s.ids.unsqueeze(-2)  # (B, T, U, k)
                logp = torch.where(hit, s.logprobs.unsqueeze(-2), -math.inf).logsumexp(-1)
            mix = logp + log_w if mix is None else torch.logaddexp(mix, logp + log_w)
        assert mix is not None
        ids, order = union.sort(dim=-1)
        values = mix.gather(-1, order)
        duplicate = torch.zeros_like(ids, dtype=torch.bool)
        duplicate[..., 1:] = ids[..., 1:] == ids[..., :-1]
        values, pick = values.masked_fill(duplicate, -math.inf).topk(k, dim=-1)
        return TopK(ids=ids.gather(-1, pick), logprobs=values)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log p_mix of each token given its prefix; position 0 and padding are 0."""
        self._need(Capability.TOKEN, "token log-probs")
        out: torch.Tensor | None = None
        unscored = torch.ones_like(input_ids, dtype=torch.bool)
        for log_w, member in zip(self._log_weights(), self.members):
            lp = member.score(input_ids, attention_mask).float()
            unscored &= lp == 0
            out = lp + log_w if out is None else torch.logaddexp(out, lp + log_w)
        assert out is not None
        # Where every member gives 0 (position 0, padding) the mixture is log Σ w_i = 0 up to rounding: make it exact.
        return out.masked_fill(unscored, 0.0)

    def generate(self, prompts: Sequence[str], **kwargs) -> list[str]:  # type: ignore[override]
        """Not defined: a mixture gives distributions, not text."""
        raise CapabilityError(
            f"a teacher mixture ({self.name}) gives next-token distributions, not generations: distil from it with "
            "kd or gkd; for teacher-written text (seqkd, dpkd, elicit) configure a single teacher "
            "(teacher.kind=local teacher.model.path=...)"
        )


def load_mixture(
    cfg: TeacherConfig, student_tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> MixtureTeacher:
    """The teachers of `teacher.mixture` as local teachers on `device`, each checked to have the student's tokenizer."""
    if not cfg.mixture:
        raise ConfigError("teacher.kind=mixture needs teacher.mixture: a list of {path, weight}")
    members = []
    for i, member in enumerate(cfg.mixture):
        spec = ModelConfig(path=member.path, dtype=cfg.model.dtype)
        tokenizer = load_tokenizer(spec)
        try:
            check_tokenizers(student_tokenizer, tokenizer)
        except TokenizerMismatch as e:
            raise TokenizerMismatch(f"teacher.mixture[{i}] ({member.path}): {e}") from None
        members.append(LocalTeacher(load_model(spec, tokenizer).to(device), tokenizer, name=f"local:{member.path}"))
    return MixtureTeacher(members, [m.weight for m in cfg.mixture])
