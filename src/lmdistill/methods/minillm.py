"""MiniLLM (Gu et al. 2024, seed 002): reverse-KL distillation by policy gradient (METHODS.md).

Per step: sample a response for each prompt from the teacher-mixed distribution p̃ = α·q + (1−α)·s
(HF ``generate`` with its KV cache for the student, and :class:`TeacherMixedSampling`, a
``LogitsProcessor`` that runs the teacher alongside with a KV cache of its own: no patched
transformers); then minimise :func:`lmdistill.losses.policy.minillm_loss` on those samples (exact
single-step reverse KL + clipped, importance-weighted policy gradient on the length-normalised
future return) plus ``lm_weight`` · cross-entropy on the data's responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from lmdistill.config import MethodConfig
from lmdistill.losses import response_ce_sum
from lmdistill.losses.policy import minillm_loss, teacher_mixed_logprobs
from lmdistill.methods.base import Batch, Loss, Method, Term, register
from lmdistill.methods.common import prompt_lengths, sample_responses, student_logits, trained, with_prefix
from lmdistill.teachers import Capability, Needs


class TeacherMixedSampling(LogitsProcessor):
    """Turn the student's next-token scores into log p̃ = log(α·softmax(q) + (1−α)·softmax(s)).

    Sampling from the returned scores (``do_sample=True`` at temperature 1, no top-k/top-p) draws
    from the mixture. The teacher runs incrementally with its own KV cache: the whole prompt on
    the first call, then only the tokens appended since the previous call. Prompts are
    left-padded as :func:`lmdistill.data.tokenize.collate_prompts` pads them, so the teacher's
    attention mask is rebuilt from ``prompt_lengths``; positions count real tokens only, as
    ``generate`` counts them for the student.

    Use one instance per ``generate`` call (it holds that call's cache).
    """

    def __init__(self, teacher: PreTrainedModel, alpha: float, prompt_lengths: Sequence[int],
                 *, vocab_size: int | None = None) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher
        self.alpha = float(alpha)
        self.prompt_lengths = list(prompt_lengths)
        self.vocab_size = vocab_size
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._seen = 0

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, V_t) the teacher's next-token logits after `input_ids` (B, L), updating the cache."""
        batch, length = input_ids.shape
        if self._cache is None:
            if batch != len(self.prompt_lengths) or max(self.prompt_lengths) != length:
                raise ValueError(
                    f"TeacherMixedSampling got prompts of shape {tuple(input_ids.shape)}, but was built for "
                    f"{len(self.prompt_lengths)} prompts of at most {max(self.prompt_lengths)} tokens"
                )
            starts = torch.tensor([length - n for n in self.prompt_lengths], device=input_ids.device)
            self._mask = (torch.arange(length, device=input_ids.device)[None, :] >= starts[:, None]).long()
            new = input_ids
        else:
            added = length - self._seen
            if added <= 0:
                raise ValueError("TeacherMixedSampling was called twice on the same sequence length")
            self._mask = torch.cat([self._mask, self._mask.new_ones(batch, added)], dim=1)
            new = input_ids[:, -added:]
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
        out = self.teacher(input_ids=new, attention_mask=self._mask, position_ids=positions,
                           past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = out.past_key_values
        self._seen = length
        logits = out.logits[:, -1]
        return logits[:, : self.vocab_size] if self.vocab_size else logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        teacher = self.teacher_logits(input_ids).to(torch.float32)
        student_logp = torch.log_softmax(scores.float(), dim=-1)
        teacher_logp = torch.log_softmax(teacher, dim=-1)
        width = student_logp.shape[-1]
        if teacher_logp.shape[-1] < width:  # the student's head padded past the vocabulary
            teacher_logp = torch.nn.functional.pad(teacher_logp, (0, width - teacher_logp.shape[-1]), value=-torch.inf)
        elif teacher_logp.shape[-1] > width:
            raise ValueError(f"teacher scores {teacher_logp.shape[-1]} tokens, the student only {width}")
        return teacher_mixed_logprobs(student_logp, teacher_logp, self.alpha)


@dataclass
class MiniLLMConfig(MethodConfig):
    """MiniLLM: single-step reverse KL + policy gradient on teacher-mixed samples, plus LM loss on data."""

    mix_alpha: float = 0.2
    """α of teacher-mixed sampling, p̃ = α·teacher + (1−α)·student (0: pure student samples)."""
    clip: float = 0.2
    """PPO-style clip ε of the importance-weighted ratio."""
    length_normalize: bool = True
    """Divide the future return by the number of future tokens (T − t − 1)."""
    whiten: bool = True
    """Normalise advantages to mean 0 and std 1 over a micro-batch's sampled tokens (as the reference code does)."""
    single_step_weight: float = 1.0
    """Weight of the single-step part (exact per-step reverse KL over the vocabulary)."""
    pg_weight: float = 1.0
    """Weight of the long part (clipped policy gradient on the future return)."""
    lm_weight: float = 1.0
    """Weight of cross-entropy on the data's responses (keeps general ability); 0 skips that forward."""
    max_new_tokens: int = 32
    """Length limit of the sampled responses."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise ValueError(f"method.mix_alpha must be in [0, 1], got {self.mix_alpha}")
        if self.clip <= 0:
            raise ValueError(f"method.clip must be > 0, got {self.clip}")
        for key in ("single_step_weight", "pg_weight", "lm_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"method.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@register
class MiniLLM(Method):
    """MiniLLM on the one loop: samples from p̃ each step, sequence-level reverse KL by policy gradient.

    The sampled tokens' loss is a mean per sampled token, next to the data CE's mean per data token.
    """

    name = "minillm"
    config_class = MiniLLMConfig

    @classmethod
    def teacher_needs(cls, cfg: MiniLLMConfig) -> Needs:
        if cfg.mix_alpha > 0:
            return Needs(Capability.FULL, weights="teacher-mixed sampling runs the teacher's model; method.mix_alpha=0 "
                         "samples from the student alone",
                         no_prefix="its teacher-mixed sampling does not apply teacher.prefix (or set method.mix_alpha=0)",
                         generates=True)
        return Needs(Capability.FULL)

    def __init__(self, cfg: MiniLLMConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        if ctx.cfg.teacher.k > 0:
            raise ValueError(
                f"method minillm uses the teacher's whole distribution; teacher.k={ctx.cfg.teacher.k} must be 0"
            )

    def sequences(self, batch: Batch) -> Batch:
        processors = None
        if self.cfg.mix_alpha > 0:
            teacher = self.ctx.teacher
            mix = TeacherMixedSampling(teacher.weights, self.cfg.mix_alpha,
                                       prompt_lengths(batch["labels"], batch["attention_mask"]),
                                       vocab_size=teacher.vocab_size)
            processors = LogitsProcessorList([mix])
        sample = sample_responses(self.ctx.model, batch, self.ctx, max_new_tokens=self.cfg.max_new_tokens,
                                  temperature=1.0, logits_processor=processors)
        return with_prefix(batch, sample, "sample_")

    def loss(self, model, batch: Batch) -> Loss:
        cfg = self.cfg
        terms: dict[str, Term] = {}
        if cfg.lm_weight > 0:
            window, labels = trained(batch)
            terms["ce"] = Term(response_ce_sum(student_logits(model, batch, window=window), labels), weight=cfg.lm_weight)
        window, sample_labels = trained(batch, "sample_")
        logits = student_logits(model, batch, "sample_", window)
        with torch.no_grad():
            teacher = self.ctx.teacher.logits(batch["sample_input_ids"], batch["sample_attention_mask"], window)
        rl, stats = minillm_loss(
            logits, teacher, sample_labels, mix_alpha=cfg.mix_alpha, clip=cfg.clip,
            length_normalize=cfg.length_normalize, whiten_advantages=cfg.whiten,
            single_step_weight=cfg.single_step_weight, pg_weight=cfg.pg_weight,
        )  # fmt: skip
        terms["minillm"] = Term(rl, "sample_labels")
        n_sample = stats.pop("tokens")
        metrics = {k: (v, n_sample) for k, v in stats.items()}
        metrics["sample_len"] = (n_sample, float(batch["sample_input_ids"].shape[0]))
        return terms, metrics
