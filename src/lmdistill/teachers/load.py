"""Build the teacher a run config names, checked against the student and the method."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from lmdistill.config import ConfigError, TeacherConfig
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers.base import CapabilityError, Teacher
from lmdistill.teachers.cache import CachedTeacher
from lmdistill.teachers.engine import place, placement
from lmdistill.teachers.local import LocalTeacher, TokenizerMismatch, check_tokenizers
from lmdistill.teachers.mixture import load_mixture
from lmdistill.teachers.server import ServerTeacher


def load_teacher(cfg: TeacherConfig, student_tokenizer: PreTrainedTokenizerBase, device: torch.device, *,
                 own_vocabulary: bool = False) -> Teacher | None:
    """The configured teacher on `device` (on `teacher.device` where that is set), frozen; None for `teacher.kind=none`.

    `local`: a model loaded here; `cache`: a top-k cache (teachers/cache/), checked to have the
    student's tokenizer; `server`: an OpenAI-compatible server (teachers/server/), whose tokenizer,
    when `teacher.model` names one, must be the student's; `mixture`: the weighted mixture of the local
    teachers of `teacher.mixture` (teachers/mixture.py), each checked to have the student's tokenizer.
    A local model placed by `teacher.device` takes inputs from, and returns outputs to, any device
    (teachers/engine.py).
    `own_vocabulary`: the method hands a local teacher the text in its own tokens (``Needs.vocabulary="own"``),
    so its tokenizer may differ from the student's (then ``shares_vocabulary`` is False); else a differing
    one is refused (:class:`TokenizerMismatch`) before its weights are loaded.
    """
    if cfg.kind == "none":
        return None
    if cfg.kind == "cache":
        if not cfg.cache:
            raise ConfigError("teacher.kind=cache needs teacher.cache (a directory written by `lmdistill cache-teacher`)")
        return CachedTeacher(cfg.cache, tokenizer=student_tokenizer)
    placed = placement(cfg.device, device)
    if cfg.kind == "mixture":
        mixture = load_mixture(cfg, student_tokenizer, placed)
        for member in mixture.members if cfg.device else []:
            place(member.weights, placed)
        return mixture
    if cfg.kind == "server":
        if not cfg.base_url:
            raise ConfigError("teacher.kind=server needs teacher.base_url (e.g. http://127.0.0.1:8080/v1)")
        tokenizer = None
        if cfg.model.path is not None or cfg.model.tokenizer:
            tokenizer = load_tokenizer(cfg.model)
            check_tokenizers(student_tokenizer, tokenizer)
        return ServerTeacher(cfg.base_url, cfg.served_model, api_key_env=cfg.api_key_env, tokenizer=tokenizer,
                             timeout=cfg.timeout, max_retries=cfg.max_retries, concurrency=cfg.concurrency)
    if cfg.model.path is None:
        raise CapabilityError("teacher.kind=local needs teacher.model.path (a Hugging Face directory or GGUF file)")
    tokenizer = load_tokenizer(cfg.model)
    shared = True
    try:
        check_tokenizers(student_tokenizer, tokenizer)
    except TokenizerMismatch:
        if not own_vocabulary:
            raise
        shared = False
    model = load_model(cfg.model, tokenizer)
    model = place(model, placed) if cfg.device else model.to(device)
    teacher = LocalTeacher(model, tokenizer, name=f"local:{cfg.model.path}", prefix=cfg.prefix)
    teacher.shares_vocabulary = shared
    return teacher
