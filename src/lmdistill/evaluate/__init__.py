"""Evaluation of a trained model: held-out cross-entropy and answers by generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import ModelConfig, RunConfig
from lmdistill.data.tokenize import Encoded, collate, collate_prompts, encode_rows, render_prompt, response_token_count


@torch.no_grad()
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
) -> list[str]:
    """Responses to `prompts` (rendered as in training), batched with left padding and a KV cache."""
    model.eval()
    device = next(model.parameters()).device
    rendered = [
        tokenizer(render_prompt(tokenizer, p, system_prompt), add_special_tokens=False)["input_ids"] for p in prompts
    ]
    out: list[str] = []
    for i in range(0, len(rendered), batch_size):
        batch = {k: v.to(device) for k, v in collate_prompts(rendered[i : i + batch_size], tokenizer.pad_token_id).items()}
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        seqs = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        new = seqs[:, batch["input_ids"].shape[1] :]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


@torch.no_grad()
def ce_sums(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    pad_id: int,
    *,
    batch_size: int = 64,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of response tokens) over tokenised examples, in eval mode."""
    from lmdistill.methods.sft import response_ce_sum

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(response_ce_sum(logits, batch["labels"]))
        count += response_token_count(batch["labels"])
    model.train(was_training)
    return total, count


def heldout_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    *,
    max_length: int,
    batch_size: int = 64,
    system_prompt: str | None = None,
) -> float:
    """Mean cross-entropy per response token (nats) over held-out rows."""
    enc = encode_rows(tokenizer, rows, max_length=max_length, truncation="response", system_prompt=system_prompt)
    total, count = ce_sums(model, enc, tokenizer.pad_token_id, batch_size=batch_size)
    return total / max(count, 1)


def exact_match_accuracy(
    predictions: Sequence[str], references: Sequence[str], normalize: Callable[[str], str] = str.strip
) -> float:
    """Share of predictions equal to their reference after `normalize`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


def answer_normalizer(source: str) -> Callable[[str], str]:
    """How answers are compared: the math task's final-answer normalisation, else stripped text."""
    if source == "math":
        from lmdistill.data.math import normalize_answer

        return normalize_answer
    return lambda s: " ".join(s.split())


def evaluate_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], cfg: RunConfig
) -> dict:
    """Held-out CE and exact-match accuracy of greedy answers, as configured in `cfg.eval`."""
    rows = list(rows)
    result: dict = {
        "heldout_ce": heldout_loss(
            model,
            tokenizer,
            rows[: cfg.eval.max_eval_rows],
            max_length=cfg.data.max_length,
            batch_size=cfg.eval.batch_size,
            system_prompt=cfg.data.system_prompt,
        )
    }
    if cfg.eval.n_generate > 0:
        sample = rows[: cfg.eval.n_generate]
        preds = generate(
            model,
            tokenizer,
            [r["prompt"] for r in sample],
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            system_prompt=cfg.data.system_prompt,
        )
        result["accuracy"] = exact_match_accuracy(preds, [r["response"] for r in sample], answer_normalizer(cfg.data.source))
        result["n_generated"] = len(sample)
        result["examples"] = [
            {"prompt": r["prompt"], "reference": r["response"], "prediction": p} for r, p in zip(sample[:5], preds[:5])
        ]
    return result


def evaluate_run(run_dir: str | Path, eval_rows: Sequence[dict] | None = None) -> dict:
    """Evaluate the final model of a run directory and write `eval.json` there.

    The model is loaded as a plain Hugging Face directory; the data comes from the run's config.
    """
    from lmdistill.config import load_config
    from lmdistill.data import load_rows
    from lmdistill.io import atomic_write_json
    from lmdistill.models import load_model, load_tokenizer

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    spec = ModelConfig(path=str(run_dir / "model"))
    tokenizer = load_tokenizer(spec)
    model = load_model(spec)
    if eval_rows is None:
        _, eval_rows = load_rows(cfg.data)
    result = evaluate_model(model, tokenizer, eval_rows, cfg)
    from lmdistill.models import count_parameters

    result["params"] = count_parameters(model, non_embedding=False)
    atomic_write_json(run_dir / "eval.json", result)
    return result
