"""A local Hugging Face model (or GGUF file) as teacher: every capability, full logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.losses import TopK
from lmdistill.teachers.base import Capability


class TokenizerMismatch(ValueError):
    """Teacher and student tokenizers do not map the same tokens to the same ids."""


def check_tokenizers(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, *, probe: str | None = None) -> None:
    """Raise unless both tokenizers have the same vocabulary with the same ids.

    Token-level distillation compares distributions id by id, so the vocabularies must agree
    exactly (the logit width may still be padded beyond them; see :class:`LocalTeacher`).
    """
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if len(sv) != len(tv):
        raise TokenizerMismatch(
            f"teacher vocabulary has {len(tv)} tokens, the student's {len(sv)}: token-level distillation needs the "
            "same tokenizer (use a text-level method such as seqkd, or a student with the teacher's tokenizer)"
        )
    differ = [tok for tok, i in sv.items() if tv.get(tok) != i]
    if differ:
        ex = ", ".join(f"{t!r}: student {sv[t]} vs teacher {tv.get(t)}" for t in differ[:3])
        raise TokenizerMismatch(f"{len(differ)} tokens have different ids in teacher and student ({ex})")
    if probe is not None and student(probe)["input_ids"] != teacher(probe)["input_ids"]:
        raise TokenizerMismatch(f"teacher and student tokenise {probe!r} differently")


class LocalTeacher:
    """A frozen causal LM in eval mode; `vocab_size` trims logits padded beyond the tokenizer."""

    capability = Capability.FULL

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, vocab_size: int | None = None,
                 name: str = "local") -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or len(tokenizer)
        self.name = name
        width = model.get_output_embeddings().weight.shape[0]
        if width < self.vocab_size:
            raise ValueError(f"teacher logits have width {width}, below its vocabulary of {self.vocab_size} tokens")

    @property
    def n_params(self) -> int:
        from lmdistill.models import count_parameters

        return count_parameters(self.model)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return out[..., : self.vocab_size]  # Qwen-style heads are padded past the tokenizer

    @torch.no_grad()
    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> TopK:
        logp = torch.log_softmax(self.logits(input_ids, attention_mask).float(), dim=-1)
        values, ids = logp.topk(k, dim=-1)
        return TopK(ids=ids, logprobs=values)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from lmdistill.losses import token_logprobs

        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return token_logprobs(self.logits(input_ids, attention_mask), labels)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
                 batch_size: int = 32) -> list[str]:
        from lmdistill.evaluate import generate

        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        system_prompt=system_prompt, do_sample=do_sample, temperature=temperature, top_p=top_p)
