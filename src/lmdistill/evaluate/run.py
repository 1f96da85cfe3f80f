"""The evaluation run: every metric of a model on its run's held-out rows, written to ``eval.json``.

:func:`evaluate_model` measures, on the run's held-out rows:

- teacher-forced, on the first ``eval.max_eval_rows`` rows (their reference responses):
  cross-entropy per response token, next-token (arg-max) accuracy, expected calibration error
  (:mod:`lmdistill.heldout`), and, when a teacher is configured, forward KL(teacher ‖ student) and
  reverse KL(student ‖ teacher) at the first response token of each row and over every response
  token (:mod:`lmdistill.evaluate.divergence`);
- by generation, on the first ``eval.n_generate`` prompts, for each decoding in ``eval.decoding``
  (greedy, sample): ROUGE-L, exact match, answer accuracy, mean generation length (tokens), the
  same split by reference length, and generation speed (:mod:`lmdistill.evaluate.answers`);
- the same generations, size and speed for the teacher, so that the student sits next to it.

:func:`evaluate_run` does this for a run directory's final model and writes ``eval.json`` there;
:func:`evaluate_path` for any model (a directory, a GGUF file, ``pypi:NAME``) with a config, and
writes an evaluation-only run directory (config.yaml + eval.json) that reports can read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill import rundir
from lmdistill.config import ModelConfig, RunConfig, save_config, to_dict
from lmdistill.data.tokenize import Encoded, encode_rows
from lmdistill.evaluate.answers import decodings
from lmdistill.evaluate.divergence import teacher_divergences
from lmdistill.heldout import heldout_stats
from lmdistill.io import atomic_write_json
from lmdistill.methods import load_config, method_rows
from lmdistill.models import count_parameters, load_model, load_tokenizer
from lmdistill.teachers.base import Capability, CapabilityError, Teacher
from lmdistill.teachers.load import load_teacher
from lmdistill.teachers.local import LocalTeacher, TokenizerMismatch

PRIMARY_KEYS = ("rouge_l", "exact_match", "accuracy", "mean_gen_length", "tokens_per_second", "length_unit",
                "length_median", "length_mean", "buckets", "examples")
"""Numbers of the first decoding copied to the top level of eval.json."""


def _params(model: torch.nn.Module) -> dict:
    return {"params": count_parameters(model, non_embedding=False),
            "params_non_embedding": count_parameters(model, non_embedding=True)}


def _with_primary(result: dict, decoded: dict, first: str, keys: Sequence[str] = PRIMARY_KEYS) -> dict:
    result["decoding"] = decoded
    if decoded:
        result.update({k: decoded[first][k] for k in keys})
        result["n_generated"] = decoded[first]["n"]
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


def evaluate_teacher(teacher: Teacher, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], cfg: RunConfig) -> dict:
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
        decoded = (decodings(teacher.weights, teacher.tokenizer, sample, cfg, prefix_ids=teacher.prefix_ids)
                   if sample else {})
    else:  # a remote teacher: wall time of its API, lengths in the student's tokens
        text_generate = teacher.generate
        if cfg.data.system_prompt is not None:
            text_generate = functools.partial(teacher.generate, system_prompt=cfg.data.system_prompt)
        try:
            decoded = decodings(None, None, sample, cfg, text_generate=text_generate,
                                count_tokens=lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                ) if sample else {}
        except CapabilityError:  # a mixture or a top-k cache gives distributions, not answers of its own
            decoded = {}
    return _with_primary(out, decoded, cfg.eval.decoding[0], [k for k in PRIMARY_KEYS if k != "examples"])


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    cfg: RunConfig,
    *,
    teacher: Teacher | None = None,
    same_vocabulary: bool = True,
) -> dict:
    """Every metric of the module docstring for `model` on held-out `rows`, as configured in `cfg.eval`.

    `teacher` (or None): also measure KL to it (when `same_vocabulary`), and its own answers,
    size and speed when `eval.compare_teacher`.
    """
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
    _with_primary(result, decodings(model, tokenizer, sample, cfg) if sample else {}, e.decoding[0])
    if teacher is not None and e.compare_teacher:
        result["teacher"] = evaluate_teacher(teacher, tokenizer, rows, cfg)
    result["eval_config"] = to_dict(e)
    return result


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_teacher_for_eval(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase,
                           device: torch.device) -> tuple[Teacher | None, bool]:
    """(teacher or None, same vocabulary?): a teacher whose tokenizer differs is still compared on its answers."""
    if cfg.teacher.kind == "none":
        return None, True
    try:
        return load_teacher(cfg.teacher, tokenizer, device), True
    except TokenizerMismatch:
        tok = load_tokenizer(cfg.teacher.model)
        model = load_model(cfg.teacher.model, tok).to(device)
        return LocalTeacher(model, tok, name=f"local:{cfg.teacher.model.path}", prefix=cfg.teacher.prefix), False


def _evaluate(spec: ModelConfig, cfg: RunConfig, eval_rows: Sequence[dict] | None) -> dict:
    device = _device()
    if eval_rows is None:
        _, eval_rows = method_rows(cfg)  # as the method evaluates (e.g. step-by-step's label prefix)
    tokenizer = load_tokenizer(spec)
    teacher, same_vocab = _load_teacher_for_eval(cfg, tokenizer, device)  # a bad teacher stops before any loading
    model = load_model(spec, tokenizer).to(device)
    result = evaluate_model(model, tokenizer, eval_rows, cfg, teacher=teacher, same_vocabulary=same_vocab)
    result["model"] = spec.path
    return result


def evaluate_run(run_dir: str | Path, eval_rows: Sequence[dict] | None = None, *,
                 overrides: list[str] | None = None) -> dict:
    """Evaluate the final model of a run directory and write `eval.json` there.

    The model is loaded as a plain Hugging Face directory; data, evaluation settings and teacher
    come from the run's config.yaml, changed by `overrides` (``key=value``, e.g. a teacher for a run
    trained without one: ``teacher.kind=local teacher.model.path=...``).
    """
    run_dir = Path(run_dir)
    if not rundir.is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {rundir.CONFIG})")
    if not (run_dir / rundir.MODEL).is_dir():
        raise FileNotFoundError(f"{run_dir}: no final model in {rundir.MODEL}/ (the run has not finished)")
    cfg = load_config(run_dir / rundir.CONFIG, overrides)
    spec = ModelConfig(path=str(run_dir / rundir.MODEL), dtype=cfg.student.dtype)
    result = json_safe(_evaluate(spec, cfg, eval_rows))
    atomic_write_json(run_dir / rundir.EVAL, result)
    return result


def evaluate_path(model: str, config: str | Path | None, out_dir: str | Path | None = None, *,
                  overrides: list[str] | None = None) -> dict:
    """Evaluate any model (directory, GGUF file, ``pypi:NAME``) on the data and settings of `config`.

    Writes an evaluation-only run directory, `out_dir` (default: the config's run directory):
    config.yaml (with ``student.path`` = `model`) and eval.json. Refuses a directory that holds a
    training run, so that its config is never overwritten.
    """
    return evaluate_config(model, load_config(config, overrides), out_dir)


def evaluate_config(model: str, cfg: RunConfig, out_dir: str | Path | None = None) -> dict:
    """:func:`evaluate_path` with a resolved config."""
    spec = ModelConfig(path=model, dtype=cfg.student.dtype)
    cfg = replace(cfg, student=spec, output_dir=str(out_dir) if out_dir is not None else cfg.output_dir)
    out = cfg.run_dir
    if rundir.has_training(out):
        raise FileExistsError(f"{out} holds a training run; give another output directory (-o DIR)")
    result = json_safe(_evaluate(spec, cfg, None))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / rundir.CONFIG)
    atomic_write_json(out / rundir.EVAL, result)
    return result
