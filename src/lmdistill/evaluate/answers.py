"""Answers generated to held-out prompts, scored against the references.

For each decoding in ``eval.decoding`` (greedy, sample): ROUGE-L, exact match, answer accuracy,
mean generation length (tokens), the same split by reference length, and generation speed (new
tokens per second), by a local model or by a text-only teacher (its API's wall time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import RunConfig
from lmdistill.evaluate.metrics import LengthBuckets, answer_correct, mean, text_length, text_scores
from lmdistill.generation import Generations, generate, generate_timed

N_EXAMPLES = 5
"""Generations kept in eval.json per decoding, for reading."""


def generation_metrics(gen: Generations, references: Sequence[str], length_unit: str = "chars") -> dict:
    """ROUGE-L, exact match, answer accuracy (means over examples), mean length, speed, and length buckets."""
    scores = text_scores(gen.texts, references)
    buckets = LengthBuckets.of([text_length(r, length_unit) for r in references])
    return {
        **{k: mean(v) for k, v in scores.items()},
        "mean_gen_length": mean(gen.n_tokens),
        "n": len(references),
        "seconds": gen.seconds,
        "tokens_per_second": gen.tokens_per_second,
        "length_unit": length_unit,
        "length_median": buckets.median,
        "length_mean": buckets.mean,
        "buckets": buckets.summarize(scores),
    }


def answer_accuracy_counts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict],
                           cfg: RunConfig) -> tuple[int, int]:
    """(correct final answers, rows) of greedy answers to `rows` (for evaluations during training)."""
    if not rows:
        return 0, 0
    texts = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=cfg.eval.max_new_tokens,
                     batch_size=cfg.eval.batch_size, system_prompt=cfg.data.system_prompt)
    return sum(answer_correct(p, r["response"]) for p, r in zip(texts, rows)), len(rows)


def decodings(
    model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None, rows: Sequence[dict], cfg: RunConfig,
    *, text_generate: Callable[..., list[str]] | None = None, count_tokens: Callable[[str], int] | None = None,
    prefix_ids: Sequence[int] = (),
) -> dict:
    """Decoding name → :func:`generation_metrics` (+ the first ``N_EXAMPLES`` examples) of every configured
    decoding, by a local `model` (seeing `prefix_ids` before each prompt) or a text-only teacher's
    `text_generate` (lengths by `count_tokens`). Each decoding is seeded with ``train.seed``, so a model
    and its teacher draw the same samples where they are the same model."""
    e = cfg.eval
    prompts = [r["prompt"] for r in rows]
    references = [r["response"] for r in rows]
    out: dict = {}
    if model is not None:  # warm-up, so that lazy initialisation is not timed
        generate_timed(model, tokenizer, prompts[:1], max_new_tokens=2, system_prompt=cfg.data.system_prompt,
                       prefix_ids=prefix_ids)
    for decoding in e.decoding:
        sample = decoding == "sample"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(cfg.train.seed)
            if model is not None:
                gen = generate_timed(model, tokenizer, prompts, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                     system_prompt=cfg.data.system_prompt, do_sample=sample, temperature=e.temperature,
                                     top_p=e.top_p, prefix_ids=prefix_ids)
            else:
                assert text_generate is not None and count_tokens is not None
                t0 = time.perf_counter()
                texts = text_generate(prompts, max_new_tokens=e.max_new_tokens, do_sample=sample,
                                      temperature=e.temperature, top_p=e.top_p)
                gen = Generations(texts, [count_tokens(t) for t in texts], time.perf_counter() - t0)
        m = generation_metrics(gen, references, e.length_unit)
        m["examples"] = [{"prompt": p, "reference": r, "prediction": t}
                         for p, r, t in zip(prompts[:N_EXAMPLES], references, gen.texts)]
        out[decoding] = m
    return out
