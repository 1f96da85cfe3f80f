"""Pieces the methods share: teacher signals, student samples and teacher outputs in the training layout."""

from __future__ import annotations

import copy

import torch
from accelerate.utils import gather_object
from transformers import LogitsProcessorList, PreTrainedModel

from lmdistill.data.tokenize import IGNORE_INDEX, Encoded, collate, end_of_turn
from lmdistill.generation import sample_ids
from lmdistill.losses import TopK, trained_window
from lmdistill.methods.base import Batch, RunContext
from lmdistill.models import causal_logits
from lmdistill.teachers import Capability


def trained(batch: Batch, prefix: str = "") -> tuple[slice, torch.Tensor]:
    """The window of positions a loss on the batch's (prefixed) `labels` needs (:func:`trained_window`) and
    those labels cut to it, (B, W): pass the window to :func:`student_logits` and :func:`teacher_signal`."""
    labels = batch[prefix + "labels"]
    window = trained_window(labels)
    return window, labels[:, window]


def student_logits(model: PreTrainedModel, batch: Batch, prefix: str = "", window: slice | None = None) -> torch.Tensor:
    """(B, W, V) logits of the student on `batch` (keys `input_ids`, `attention_mask`, optionally prefixed)
    at the positions `window` (None: all, W = T); the output head runs on those only."""
    return causal_logits(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"], window)


@torch.no_grad()
def teacher_signal(ctx: RunContext, batch: Batch, prefix: str = "", window: slice | None = None) -> torch.Tensor | TopK:
    """The teacher on `batch` at the positions `window` (None: all): full logits (B, W, V), or TopK (B, W, k)
    when `teacher.k` > 0 or the backend gives no more (its own k, a cache's, else 64)."""
    teacher = ctx.teacher
    assert teacher is not None
    ids, am = batch[prefix + "input_ids"], batch[prefix + "attention_mask"]
    k = ctx.cfg.teacher.k
    if teacher.capability >= Capability.FULL and k <= 0:
        return teacher.logits(ids, am, window)
    return teacher.topk(ids, am, k if k > 0 else teacher.k or 64, window)


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Length of each row's prompt: the index of its first trained label (or its whole length)."""
    out = []
    for lab, am in zip(labels, attention_mask):
        trained = (lab != IGNORE_INDEX).nonzero()
        out.append(int(trained[0]) if len(trained) else int(am.sum()))
    return out


def batch_prompts(batch: Batch, prefix: str = "") -> list[list[int]]:
    """Each row's prompt token ids (the tokens before its first trained label), of the `prefix`ed sequences."""
    lengths = prompt_lengths(batch[prefix + "labels"], batch[prefix + "attention_mask"])
    return [row[:n].tolist() for row, n in zip(batch[prefix + "input_ids"], lengths)]


def batch_responses(batch: Batch, prefix: str = "") -> list[list[int]]:
    """Each row's response token ids (its trained labels), of the `prefix`ed sequences."""
    return [lab[lab != IGNORE_INDEX].tolist() for lab in batch[prefix + "labels"]]


def in_teacher_tokens(ctx: RunContext, batch: Batch, prefix: str = "") -> Batch:
    """The batch's (`prefix`ed) sequences as the teacher reads them, in the training layout.

    A teacher that shares the student's vocabulary reads the same ids. One with another tokenizer reads
    its own prompt (``teacher_input_ids``, the rows encoded in its tokens) and each response decoded to
    text (special tokens dropped) and re-encoded with its tokenizer, followed by its own end of turn where
    the response holds the student's EOS.
    """
    teacher = ctx.teacher
    assert teacher is not None
    keys = ("input_ids", "attention_mask", "labels")
    if teacher.shares_vocabulary:
        return {k: batch[prefix + k] for k in keys}
    tok = teacher.tokenizer
    if tok is None or "teacher_input_ids" not in batch:
        raise ValueError("a teacher with another tokenizer reads the rows in its own tokens: encode them with "
                         "encode_rows(..., teacher_tokenizer=...) (the loop does, for Needs.vocabulary 'own'/'any')")
    ids = batch_responses(batch, prefix)
    texts, eot = ctx.tokenizer.batch_decode(ids, skip_special_tokens=True), end_of_turn(tok)
    responses = [tok(t + (eot if ctx.tokenizer.eos_token_id in r else ""), add_special_tokens=False)["input_ids"]
                 for t, r in zip(texts, ids)]
    return training_layout(batch_prompts(batch, "teacher_"), responses, tok.pad_token_id, batch["input_ids"].device)


def training_layout(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    device: torch.device) -> Batch:
    """A right-padded batch (input_ids, attention_mask, labels with the prompt masked) of prompt + response rows."""
    examples = [Encoded(input_ids=p + r, n_prompt=len(p), id="") for p, r in zip(prompts, responses)]
    return {k: v.to(device) for k, v in collate(examples, pad_id).items()}


def sample_responses(model: PreTrainedModel, batch: Batch, ctx: RunContext, *, max_new_tokens: int,
                     temperature: float = 1.0, logits_processor: LogitsProcessorList | None = None) -> Batch:
    """Each row's response replaced by a sample of the student `model` (as the loop prepared it) given
    the row's prompt, in the training layout. `logits_processor` reshapes the student's scores before
    sampling (MiniLLM's teacher-mixed sampling)."""
    tok = ctx.tokenizer
    prompts = batch_prompts(batch)
    responses = sample_ids(ctx.accelerator.unwrap_model(model), prompts, pad_id=tok.pad_token_id,
                           eos_id=tok.eos_token_id, max_new_tokens=max_new_tokens, temperature=temperature,
                           logits_processor=logits_processor)
    return training_layout(prompts, responses, tok.pad_token_id, batch["input_ids"].device)


def teacher_outputs(ctx: RunContext, batch: Batch, cache: dict[tuple[int, ...], list[int]], max_new_tokens: int) -> Batch:
    """The local teacher's greedy responses to the batch's prompts (after its `prefix_ids`), in the training layout.

    Generated once per prompt and kept in `cache` (prompt ids → response ids), which the method keeps in
    its checkpoints (:func:`outputs_state`), so a resumed run does not generate them again. The teacher must have
    weights here (the method's :class:`~lmdistill.teachers.base.Needs` say so). A teacher with another tokenizer generates
    from its own prompt (``teacher_input_ids``), at most `max_new_tokens` of its tokens, and its text is
    re-encoded with the student's tokenizer, followed by the student's end of turn where it ended its turn.
    """
    teacher, tok = ctx.teacher, ctx.tokenizer
    assert teacher is not None and teacher.weights is not None
    prompts = batch_prompts(batch)
    keys = list(dict.fromkeys(map(tuple, prompts)))
    missing = [p for p in keys if p not in cache]
    if missing:
        own = teacher.shares_vocabulary
        t_tok = tok if own else teacher.tokenizer
        t_prompts = dict(zip(map(tuple, prompts), prompts if own else batch_prompts(batch, "teacher_")))
        seen = [list(teacher.prefix_ids) + list(t_prompts[p]) for p in missing]
        out = sample_ids(teacher.weights, seen, pad_id=t_tok.pad_token_id, eos_id=t_tok.eos_token_id,
                         max_new_tokens=max_new_tokens, do_sample=False)
        if not own:  # the text, then the student's end of turn where the teacher ended its own
            eot = end_of_turn(tok)
            texts = t_tok.batch_decode(out, skip_special_tokens=True)
            out = [tok(text + (eot if t_tok.eos_token_id in ids else ""), add_special_tokens=False)["input_ids"]
                   or [tok.eos_token_id] for text, ids in zip(texts, out)]
        cache.update(zip(missing, out))
    return training_layout(prompts, [cache[tuple(p)] for p in prompts], tok.pad_token_id, batch["input_ids"].device)


def outputs_state(ctx: RunContext, cache: dict[tuple[int, ...], list[int]]) -> dict[str, torch.Tensor]:
    """A `teacher_outputs` cache as four flat int64 tensors (concatenated prompts and responses, and their
    lengths), for a checkpoint: a resumed run neither generates them again nor counts their FLOPs twice.

    Call on every process (as the checkpoint calls `state_dict`): each process's outputs are merged into
    `cache` on all of them first, so that the checkpoint (process 0's state) holds every process's."""
    if ctx.accelerator.num_processes > 1:
        for part in gather_object([cache]):
            cache.update(part)
    prompts = list(cache)

    def flat(seqs: list) -> torch.Tensor:
        return torch.tensor([i for s in seqs for i in s], dtype=torch.int64)

    return {"prompts": flat(prompts), "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.int64),
            "responses": flat([cache[p] for p in prompts]),
            "response_lengths": torch.tensor([len(cache[p]) for p in prompts], dtype=torch.int64)}


def outputs_from_state(state: dict[str, torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """The inverse of :func:`outputs_state`."""
    prompts = torch.split(state["prompts"], state["prompt_lengths"].tolist())
    responses = torch.split(state["responses"], state["response_lengths"].tolist())
    return {tuple(p.tolist()): r.tolist() for p, r in zip(prompts, responses)}


def with_prefix(batch: Batch, extra: Batch, prefix: str) -> Batch:
    """`batch` plus `extra`'s tensors under prefixed keys (e.g. `sample_input_ids`)."""
    return {**batch, **{prefix + k: v for k, v in extra.items()}}


class FrozenStart:
    """The student as it was when the run started, frozen: DPO's reference model, RLAIF's KL anchor.

    Copied from the prepared student at its first use (before the first optimizer step) and kept in the
    method's checkpoints, so a resumed run compares with the same start. A deep copy keeps the student's
    FLOP-meter hook, which counts the frozen copy's forwards at 2·N.
    """

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._model: torch.nn.Module | None = None

    def _copy(self) -> torch.nn.Module:
        unwrapped = self.ctx.accelerator.unwrap_model(self.ctx.model)
        return copy.deepcopy(unwrapped).eval().requires_grad_(False)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self._copy()
        return self._model

    def state_dict(self) -> dict:
        """``{"reference": weights}`` once the copy exists, else empty."""
        return {"reference": self._model.state_dict()} if self._model is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "reference" in state:
            self._model = self._copy()
            self._model.load_state_dict(state["reference"])
