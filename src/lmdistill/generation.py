"""Sampling and greedy decoding of a local model: the one place that calls ``model.generate``.

Prompts are left-padded (:func:`~lmdistill.data.tokenize.collate_prompts`) and decoded with a KV
cache in eval mode; the model's train/eval mode is restored afterwards. Sampling draws from the
global torch generator (seed it for reproducible samples); only `temperature` and `top_p` shape the
distribution. A token is drawn by inverse CDF (:class:`InverseCDFSampler`: one uniform per row against
the cumulative sum of the probabilities), which is exact and about 25x cheaper on a CPU than
``torch.multinomial``, whose exponential noise over the whole vocabulary was most of an on-policy
step's sampling time (49,152 tokens for SmolLM2). On a CPU the output head of a decoding step is computed
as W·hᵀ (:class:`DecodeHead`): BLAS's few-row product h·Wᵀ ran on one thread at a fraction of its speed
and was half of a decoding step (``bench/decode_head.py``).

- :func:`sample_ids`: token ids in, token ids out (what the training methods sample);
- :func:`generate_timed` / :func:`generate`: strings in, strings out, rendered as in training
  (what evaluation, local teachers and elicitation use).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from lmdistill.data.tokenize import collate_prompts, render_prompt


@dataclass
class Generations:
    """Decoded responses, their lengths and the wall time of generating them."""

    texts: list[str]
    n_tokens: list[int]
    """Response lengths in new tokens, up to and not counting EOS."""
    seconds: float
    n_decoded: int | None = None
    """Tokens decoded, EOS included (what the speed counts); default: sum of `n_tokens`."""

    @property
    def tokens_per_second(self) -> float:
        n = sum(self.n_tokens) if self.n_decoded is None else self.n_decoded
        return n / self.seconds if self.seconds > 0 else math.nan


class InverseCDFSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores) and returns scores whose argmax is that token
    (0 there, −inf elsewhere), so that greedy decoding with this processor last samples exactly.

    Inverse CDF: token i is drawn when u·Σp falls in [c_{i−1}, c_i) of the float64 cumulative sum c of the
    probabilities, u ~ U[0, 1) from the global torch generator; tokens of probability 0 (filtered by
    top-p, or −inf scores) are never drawn. Scores (B, V) in, (B, V) out.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1).double()
        cdf = probs.cumsum(-1)  # (B, V)
        u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * cdf[:, -1:]
        # side="right": the first c_i > u, so a zero-probability token (c_i = c_{i-1}) is never chosen.
        pick = torch.searchsorted(cdf, u, right=True).clamp(max=scores.shape[-1] - 1)  # (B, 1)
        return torch.full_like(scores, -math.inf).scatter_(-1, pick, 0.0)


DECODE_HEAD_ROWS = 8
"""Up to this many rows, :class:`DecodeHead` computes W·hᵀ; above it, the head's own product h·Wᵀ."""


class DecodeHead(torch.nn.Module):
    """A model's linear output head, computed for few rows as W·hᵀ: the same weight (shared, not copied)
    and the same numbers up to float summation order.

    On a CPU, MKL's product of a few rows with a transposed (V, H) weight runs on one thread at a fraction
    of its speed; W·hᵀ, the same product with the vocabulary as the long side, uses every core (2.1x faster
    for 8 rows of SmolLM2's 49,152 x 256 head on 2 cores, ``bench/decode_head.py``). Past
    :data:`DECODE_HEAD_ROWS` rows the head's own product is used: from 12 to 64 rows the two were measured
    from 0.6x to 1.5x of each other, varying with the shape and from run to run. Hidden states (..., H) in,
    logits (..., V) out, contiguous.
    """

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] > DECODE_HEAD_ROWS:
            return self.head(hidden)
        out = (self.head.weight @ rows.T).T
        if self.head.bias is not None:
            out = out + self.head.bias
        return out.contiguous().reshape(*hidden.shape[:-1], out.shape[-1])


@contextmanager
def decode_head(model: PreTrainedModel) -> Iterator[None]:
    """While decoding, `model`'s output head is a :class:`DecodeHead` around it when it is a plain
    ``nn.Linear`` on the CPU (where it was measured to pay), not sharded; the head is put back afterwards, also
    on error."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or isinstance(head.weight, DTensor):
        yield
        return
    model.set_output_embeddings(DecodeHead(head))
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def sampling_processors(temperature: float, top_p: float) -> LogitsProcessorList:
    """Temperature, nucleus filtering and the exact draw (:class:`InverseCDFSampler`), for greedy `generate`."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    out.append(InverseCDFSampler())
    return out


def _decode_batch(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    logits_processor: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """(B, <= max_new_tokens) new tokens after the left-padded `prompts`; rows that stopped early are
    padded with `pad_id` after their EOS. The caller sets eval mode and no_grad.

    Sampling runs as greedy decoding whose last processors draw the token (:func:`sampling_processors`),
    after `logits_processor`."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_id).items()}
    processors = LogitsProcessorList(logits_processor or [])
    if do_sample:
        processors.extend(sampling_processors(temperature, top_p))
    with decode_head(model):
        seqs = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **({"logits_processor": processors} if processors else {}),
        )
    return seqs[:, batch["input_ids"].shape[1] :]


@torch.no_grad()
def decode_speed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                 new_tokens: int = 32, system_prompt: str | None = None) -> float:
    """Greedy decoding speed of `model` in new tokens per second: all `prompts` as one left-padded batch,
    exactly `new_tokens` each (EOS suppressed), KV cache, after one untimed warm-up step.

    Every model decodes the same number of positions, so the speeds of two models compare their cost per
    token and nothing else (the evaluation's ``tokens_per_second`` also depends on how long each answers).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = [tokenizer(render_prompt(tokenizer, p, system_prompt), add_special_tokens=False)["input_ids"] for p in prompts]
    batch = {k: v.to(device) for k, v in collate_prompts(ids, tokenizer.pad_token_id).items()}
    try:
        with decode_head(model):
            model.generate(**batch, do_sample=False, max_new_tokens=1, pad_token_id=tokenizer.pad_token_id)
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            _sync(device)
            seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / seconds


@torch.no_grad()
def sample_ids(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    logits_processor: LogitsProcessorList | None = None,
) -> list[list[int]]:
    """Continuations of token-id prompts, left-padded (data.tokenize.collate_prompts), KV cache, in eval mode (restored after).

    Each ends at its first EOS (kept) or after max_new_tokens, pad stripped; never empty ([eos_id] if nothing).
    top_k=0 when sampling. `do_sample=False` decodes greedily. `logits_processor` is handed to
    ``generate``, which applies it to the model's scores before any sampling warper (e.g. MiniLLM's
    teacher-mixed sampling). All prompts are decoded as one batch.
    """
    was_training = model.training
    model.eval()
    try:
        new = _decode_batch(model, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
                            do_sample=do_sample, temperature=temperature, top_p=top_p,
                            logits_processor=logits_processor).tolist()
    finally:
        model.train(was_training)
    out = []
    for gen in new:
        if eos_id in gen:
            gen = gen[: gen.index(eos_id) + 1]
        else:
            gen = [t for t in gen if t != pad_id]
        out.append(gen or [eos_id])
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_timed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    system_prompt: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prefix_ids: Sequence[int] = (),
) -> Generations:
    """Responses to `prompts` (rendered as in training), batched with left padding and a KV cache.

    Sampling draws from the global torch generator (seed it for reproducible samples). The model's
    train/eval mode is restored afterwards. `prefix_ids` go before every rendered prompt (a teacher's
    `teacher.prefix`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rendered = [
        list(prefix_ids) + tokenizer(render_prompt(tokenizer, p, system_prompt), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    eos = tokenizer.eos_token_id
    texts: list[str] = []
    lengths: list[int] = []
    decoded = 0
    try:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(rendered), batch_size):
            new = _decode_batch(model, rendered[i : i + batch_size], pad_id=tokenizer.pad_token_id, eos_id=eos,
                                max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                top_p=top_p)  # (B, <= max_new_tokens)
            for row in new.tolist():
                n = row.index(eos) if eos in row else len(row)
                lengths.append(n)
                decoded += min(n + 1, len(row))
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return Generations(texts, lengths, seconds, decoded)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    system_prompt: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prefix_ids: Sequence[int] = (),
) -> list[str]:
    """Responses to `prompts` (rendered as in training), batched with left padding and a KV cache."""
    return generate_timed(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt,
        do_sample=do_sample, temperature=temperature, top_p=top_p, prefix_ids=prefix_ids,
    ).texts
