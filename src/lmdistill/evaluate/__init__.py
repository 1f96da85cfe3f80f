"""Evaluation of a trained model: held-out loss and calibration, divergence to the teacher, answers.

:func:`evaluate_model` measures, on the run's held-out rows:

- teacher-forced, on the first ``eval.max_eval_rows`` rows (their reference responses):
  cross-entropy per response token, next-token (arg-max) accuracy, expected calibration error,
  and, when a teacher is configured, forward KL(teacher ‖ student) and reverse KL(student ‖ teacher)
  at the first response token of each row and over every response token;
- by generation, on the first ``eval.n_generate`` prompts, for each decoding in ``eval.decoding``
  (greedy, sample): ROUGE-L, exact match, answer accuracy, mean generation length (tokens), the
  same split by reference length, and generation speed (new tokens per second);
- the same generations, size and speed for the teacher, so that the student sits next to it.

:func:`evaluate_run` does this for a run directory's final model and writes ``eval.json`` there;
:func:`evaluate_path` for any model (a directory, a GGUF file, ``pypi:NAME``) with a config, and
writes an evaluation-only run directory (config.yaml + eval.json) that reports can read.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import ModelConfig, RunConfig
from lmdistill.data.tokenize import Encoded, collate, collate_prompts, encode_rows, render_prompt
from lmdistill.generation import Generations, generate, generate_timed
from lmdistill.evaluate.metrics import (
    LengthBuckets,
    TokenStats,
    divergence_sums,
    mean,
    text_length,
    text_scores,
    token_stats,
)

N_EXAMPLES = 5
"""Generations kept in eval.json per decoding, for reading."""


# --------------------------------------------------------------------------- teacher-forced metrics


@torch.no_grad()
def heldout_stats(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    pad_id: int,
    *,
    batch_size: int = 64,
    n_bins: int = 10,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> TokenStats:
    """Cross-entropy, next-token accuracy and calibration sums over the examples' response tokens (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = TokenStats.zeros(n_bins)
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        total = total + token_stats(logits, batch["labels"], n_bins=n_bins)
    model.train(was_training)
    return total


def ce_sums(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    pad_id: int,
    *,
    batch_size: int = 64,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of response tokens) over tokenised examples, in eval mode."""
    stats = heldout_stats(model, examples, pad_id, batch_size=batch_size, autocast=autocast, n_bins=1)
    return stats.ce, stats.tokens


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


@torch.no_grad()
def teacher_divergences(
    model: torch.nn.Module, teacher, examples: Sequence[Encoded], pad_id: int, *, batch_size: int = 64
) -> dict:
    """Mean forward and reverse KL to the teacher on the examples' reference responses.

    ``fkl_first`` / ``rkl_first``: at the position predicting each row's first response token
    (DPKD compares models there); ``fkl_all`` / ``rkl_all``: mean over every response token.
    Full logits when the teacher gives them, else its top-64 log-probs (a cache's own k) plus a tail
    bucket, or tail samples for ``fkl`` where the cache has them.
    """
    from lmdistill.teachers.base import Capability

    full = teacher.capability >= Capability.FULL
    k = 64 if teacher.k is None else min(64, teacher.k)  # a cache holds its own k
    support = "full"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    for i in range(0, len(examples), batch_size):
        batch = {key: v.to(device) for key, v in collate(examples[i : i + batch_size], pad_id).items()}
        ids, am = batch["input_ids"], batch["attention_mask"]
        student = model(input_ids=ids, attention_mask=am).logits  # (B, T, V)
        signal = teacher.logits(ids, am) if full else teacher.topk(ids, am, k)
        if not full:
            support = f"top-{k} + {'tail samples' if signal.sampled else 'tail'}"
        if full:
            # A head padded past the shared vocabulary (Qwen-style) is cut to the teacher's width.
            student = student[..., : signal.shape[-1]]
        for name, v in divergence_sums(student, signal, batch["labels"]).items():
            sums[name] = sums.get(name, 0.0) + v
    model.train(was_training)
    out: dict = {"support": support}
    for which in ("first", "all"):
        n = int(sums.get(f"n_{which}", 0))
        out[f"n_{which}"] = n
        for kind in ("fkl", "rkl"):
            out[f"{kind}_{which}"] = sums[f"{kind}_{which}"] / n if n else math.nan
    return out


# --------------------------------------------------------------------------- answers


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
    from lmdistill.evaluate.metrics import answer_correct

    if not rows:
        return 0, 0
    texts = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=cfg.eval.max_new_tokens,
                     batch_size=cfg.eval.batch_size, system_prompt=cfg.data.system_prompt)
    return sum(answer_correct(p, r["response"]) for p, r in zip(texts, rows)), len(rows)


# --------------------------------------------------------------------------- the evaluation


def _params(model: torch.nn.Module) -> dict:
    from lmdistill.models import count_parameters

    return {"params": count_parameters(model, non_embedding=False),
            "params_non_embedding": count_parameters(model, non_embedding=True)}


def _decode_all(
    model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None, rows: Sequence[dict], cfg: RunConfig,
    *, text_generate: Callable | None = None, count_tokens: Callable[[str], int] | None = None,
    prefix_ids: Sequence[int] = (),
) -> dict:
    """Metrics of every configured decoding (greedy, sample), by a local model (seeing `prefix_ids` before each
    prompt) or a text-only teacher."""
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


PRIMARY_KEYS = ("rouge_l", "exact_match", "accuracy", "mean_gen_length", "tokens_per_second", "length_unit",
                "length_median", "length_mean", "buckets", "examples")
"""Numbers of the first decoding copied to the top level of eval.json."""


def _with_primary(result: dict, decodings: dict, first: str, keys: Sequence[str] = PRIMARY_KEYS) -> dict:
    result["decoding"] = decodings
    if decodings:
        result.update({k: decodings[first][k] for k in keys})
        result["n_generated"] = decodings[first]["n"]
    return result


def json_safe(obj):
    """`obj` with NaN and infinities replaced by None, so that the JSON written is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def evaluate_teacher(teacher, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], cfg: RunConfig) -> dict:
    """The teacher's own answers, size and speed, measured as the student's are."""
    out: dict = {"name": teacher.name}
    sample = list(rows)[: cfg.eval.n_generate]
    if teacher.weights is not None:  # a model here: measured as the student is, in its own tokens
        out.update(_params(teacher.weights))
        e = cfg.eval
        enc = encode_rows(teacher.tokenizer, list(rows)[: e.max_eval_rows], max_length=cfg.data.max_length,
                          truncation="response", system_prompt=cfg.data.system_prompt)
        if teacher.prefix_ids:  # the teacher's view: its prefix before every row
            enc = [Encoded(teacher.prefix_ids + x.input_ids, len(teacher.prefix_ids) + x.n_prompt, x.id) for x in enc]
        m = heldout_stats(teacher.weights, enc, teacher.tokenizer.pad_token_id, batch_size=e.batch_size,
                          n_bins=e.ece_bins).metrics()
        out.update(heldout_ce=m["ce"], token_acc=m["token_acc"], ece=m["ece"])
        decodings = (_decode_all(teacher.weights, teacher.tokenizer, sample, cfg, prefix_ids=teacher.prefix_ids)
                     if sample else {})
    else:  # a remote teacher: wall time of its API, lengths in the student's tokens
        from lmdistill.teachers.base import CapabilityError

        text_generate = teacher.generate
        if cfg.data.system_prompt is not None:
            text_generate = functools.partial(teacher.generate, system_prompt=cfg.data.system_prompt)
        try:
            decodings = _decode_all(None, None, sample, cfg, text_generate=text_generate,
                                    count_tokens=lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                    ) if sample else {}
        except CapabilityError:  # a mixture or a top-k cache gives distributions, not answers of its own
            decodings = {}
    return _with_primary(out, decodings, cfg.eval.decoding[0], [k for k in PRIMARY_KEYS if k != "examples"])


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    cfg: RunConfig,
    *,
    teacher=None,
    same_vocabulary: bool = True,
) -> dict:
    """Every metric of the module docstring for `model` on held-out `rows`, as configured in `cfg.eval`.

    `teacher` (a Teacher, or None): also measure KL to it (when `same_vocabulary`), and its own answers,
    size and speed when `eval.compare_teacher`.
    """
    from lmdistill.teachers.base import Capability

    rows = list(rows)
    e = cfg.eval
    enc = encode_rows(tokenizer, rows[: e.max_eval_rows], max_length=cfg.data.max_length, truncation="response",
                      system_prompt=cfg.data.system_prompt)
    stats = heldout_stats(model, enc, tokenizer.pad_token_id, batch_size=e.batch_size, n_bins=e.ece_bins)
    m = stats.metrics()
    result: dict = {
        **_params(model),
        "heldout_ce": m["ce"],
        "token_acc": m["token_acc"],
        "ece": m["ece"],
        "heldout_rows": len(enc),
        "heldout_tokens": stats.tokens,
    }
    if teacher is not None and same_vocabulary and teacher.capability >= Capability.TOPK:
        result["teacher_kl"] = teacher_divergences(model, teacher, enc, tokenizer.pad_token_id, batch_size=e.batch_size)
    sample = rows[: e.n_generate]
    decodings = _decode_all(model, tokenizer, sample, cfg) if sample else {}
    _with_primary(result, decodings, e.decoding[0])
    if teacher is not None and e.compare_teacher:
        result["teacher"] = evaluate_teacher(teacher, tokenizer, rows, cfg)
    from lmdistill.config import to_dict

    result["eval_config"] = to_dict(e)
    return result


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_teacher_for_eval(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device):
    """(teacher or None, same vocabulary?): a teacher whose tokenizer differs is still compared on its answers."""
    if cfg.teacher.kind == "none":
        return None, True
    from lmdistill.teachers.load import load_teacher
    from lmdistill.teachers.local import LocalTeacher, TokenizerMismatch

    try:
        return load_teacher(cfg.teacher, tokenizer, device), True
    except TokenizerMismatch:
        from lmdistill.models import load_model, load_tokenizer

        tok = load_tokenizer(cfg.teacher.model)
        model = load_model(cfg.teacher.model, tok).to(device)
        return LocalTeacher(model, tok, name=f"local:{cfg.teacher.model.path}", prefix=cfg.teacher.prefix), False


def _evaluate(spec: ModelConfig, cfg: RunConfig, eval_rows: Sequence[dict] | None) -> dict:
    from lmdistill.methods import method_rows
    from lmdistill.models import load_model, load_tokenizer

    device = _device()
    if eval_rows is None:
        _, eval_rows = method_rows(cfg)  # as the method evaluates (e.g. step-by-step's label prefix)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer).to(device)
    teacher, same_vocab = _load_teacher_for_eval(cfg, tokenizer, device)
    result = evaluate_model(model, tokenizer, eval_rows, cfg, teacher=teacher, same_vocabulary=same_vocab)
    result["model"] = spec.path
    return result


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a run directory (it holds the resolved config.yaml)."""
    return (Path(path) / "config.yaml").is_file()


def evaluate_run(run_dir: str | Path, eval_rows: Sequence[dict] | None = None, *,
                 overrides: list[str] | None = None) -> dict:
    """Evaluate the final model of a run directory and write `eval.json` there.

    The model is loaded as a plain Hugging Face directory; data, evaluation settings and teacher
    come from the run's config.yaml, changed by `overrides` (``key=value``, e.g. a teacher for a run
    trained without one: ``teacher.kind=local teacher.model.path=...``).
    """
    from lmdistill.io import atomic_write_json
    from lmdistill.methods import load_config

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"{run_dir}: no final model in model/ (the run has not finished)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    spec = ModelConfig(path=str(run_dir / "model"), dtype=cfg.student.dtype)
    result = json_safe(_evaluate(spec, cfg, eval_rows))
    atomic_write_json(run_dir / "eval.json", result)
    return result


def evaluate_path(model: str, config: str | Path | None, out_dir: str | Path | None = None, *,
                  overrides: list[str] | None = None) -> dict:
    """Evaluate any model (directory, GGUF file, ``pypi:NAME``) on the data and settings of `config`.

    Writes an evaluation-only run directory, `out_dir` (default: the config's run directory):
    config.yaml (with ``student.path`` = `model`) and eval.json. Refuses a directory that holds a
    training run, so that its config is never overwritten.
    """
    from lmdistill.config import save_config
    from lmdistill.io import atomic_write_json
    from lmdistill.methods import load_config

    cfg = load_config(config, overrides)
    spec = ModelConfig(path=model, dtype=cfg.student.dtype)
    cfg = replace(cfg, student=spec, output_dir=str(out_dir) if out_dir is not None else cfg.output_dir)
    out = cfg.run_dir
    if (out / "metrics.jsonl").exists() or (out / "train_summary.json").exists():
        raise FileExistsError(f"{out} holds a training run; give another output directory (-o DIR)")
    result = json_safe(_evaluate(spec, cfg, None))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "eval.json", result)
    return result
