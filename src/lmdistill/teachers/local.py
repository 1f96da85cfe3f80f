"""A local Hugging Face model (or GGUF file) as teacher: every capability, full logits."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.generation import generate
from lmdistill.io import UserError
from lmdistill.losses import TopK, token_logprobs
from lmdistill.models import causal_logits
from lmdistill.teachers.base import CROSS_TOKENIZER, Capability, Teacher


class TokenizerMismatch(UserError, ValueError):
    """Teacher and student tokenizers do not map the same tokens to the same ids."""


def check_tokenizers(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, *, probe: str | None = None) -> None:
    """Raise unless both tokenizers have the same vocabulary with the same ids.

    Token-level distillation compares distributions id by id, so the vocabularies must agree
    exactly (the logit width may still be padded beyond them; see :class:`LocalTeacher`). Each refusal
    says how to distil from a teacher with another tokenizer.
    """
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if len(sv) != len(tv):
        raise TokenizerMismatch(
            f"teacher vocabulary has {len(tv)} tokens, the student's {len(sv)}: token-level distillation on the "
            f"student's token ids needs the same tokenizer; {CROSS_TOKENIZER}"
        )
    differ = [tok for tok, i in sv.items() if tv.get(tok) != i]
    if differ:
        ex = ", ".join(f"{t!r}: student {sv[t]} vs teacher {tv.get(t)}" for t in differ[:3])
        raise TokenizerMismatch(f"{len(differ)} tokens have different ids in teacher and student ({ex}); "
                                f"{CROSS_TOKENIZER}")
    if probe is not None and student(probe)["input_ids"] != teacher(probe)["input_ids"]:
        raise TokenizerMismatch(f"teacher and student tokenise {probe!r} differently; {CROSS_TOKENIZER}")


class LocalTeacher(Teacher):
    """A frozen causal LM in eval mode; `vocab_size` trims logits padded beyond the tokenizer.

    `batch_size`: prompts per generation call of :meth:`generate`.
    """

    capability = Capability.FULL

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, vocab_size: int | None = None,
                 name: str = "local", prefix: str | None = None, batch_size: int = 32) -> None:
        self.weights = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or len(tokenizer)
        self.name = name
        self.batch_size = batch_size
        self.prefix_ids: list[int] = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        """Token ids the teacher sees before every sequence (`teacher.prefix`); the outputs leave them out."""
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._prefix_for: torch.device | None = None  # the inputs' device the prefix cache was made for
        self.engine: torch.nn.Module | None = None
        """DeepSpeed's engine where ZeRO-3 partitions the model (it holds the partitioning; teachers/engine.py)."""
        width = model.get_output_embeddings().weight.shape[0]
        if width < self.vocab_size:
            raise ValueError(f"teacher logits have width {width}, below its vocabulary of {self.vocab_size} tokens")

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice | None = None) -> torch.Tensor:
        if self.prefix_ids:
            out = self._prefixed_logits(input_ids, attention_mask, window)
        else:
            out = causal_logits(self.weights, input_ids, attention_mask, window)
        return out[..., : self.vocab_size]  # Qwen-style heads are padded past the tokenizer

    def _prefixed_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice | None) -> torch.Tensor:
        """(B, W, V) logits of prefix + each row, at the rows' positions `window`; the prefix's keys and values
        are computed once and shared by every call (rows are right-padded, so positions continue after it)."""
        device = input_ids.device
        if self._prefix_kv is None or self._prefix_for != device:
            ids = torch.tensor([self.prefix_ids], device=device)
            cache = self.weights(input_ids=ids, use_cache=True).past_key_values  # on the model's device (engine.place)
            self._prefix_kv, self._prefix_for = [(k, v) for k, v, *_ in cache], device
        B, P = input_ids.shape[0], len(self.prefix_ids)
        cache = DynamicCache([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in self._prefix_kv],
                             config=self.weights.config)
        mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        return causal_logits(self.weights, input_ids, mask, window, past_key_values=cache, use_cache=True)

    @torch.no_grad()
    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, window: slice | None = None) -> TopK:
        logp = torch.log_softmax(self.logits(input_ids, attention_mask, window).float(), dim=-1)
        values, ids = logp.topk(k, dim=-1)
        return TopK(ids=ids, logprobs=values)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return token_logprobs(self.logits(input_ids, attention_mask), labels)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
                 seed: int | None = None) -> list[str]:
        with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            return generate(self.weights, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                            batch_size=self.batch_size, system_prompt=system_prompt, do_sample=do_sample,
                            temperature=temperature, top_p=top_p, prefix_ids=self.prefix_ids)
