"""Rows → token ids with the loss on response tokens only, and batches of them.

A row's prompt is rendered with the tokenizer's chat template when it has one (the generation
prompt included, so the response starts where the assistant speaks), else as
``PLAIN_PROMPT.format(prompt=...)`` after the BOS token. The response ends with the template's
end of turn, or EOS. Labels are the input ids with every prompt and padding position set to
``IGNORE_INDEX``; the model's shift (position t predicts t+1) is applied by the losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase

from lmdistill.data.align import align_offsets, common_prefix, token_offsets
from lmdistill.data.rows import DataError

IGNORE_INDEX = -100
PLAIN_PROMPT = "{prompt}\n"


@dataclass
class Encoded:
    """One tokenised row: `input_ids` = prompt + response; `n_prompt` leading ids are not trained on."""

    input_ids: list[int]
    n_prompt: int
    id: str
    teacher_prompt_ids: list[int] | None = None
    """What the teacher sees instead of the prompt (row field `teacher_prompt`, e.g. context + prompt), or the
    prompt in the teacher's own tokens (a teacher with another tokenizer, :func:`with_teacher_tokens`)."""
    ranked_ids: list[list[int]] | None = None
    """Response ids of the row's ranked responses, best first (row field `ranked_responses`, e.g. the chosen
    and rejected of a preference pair), each after the same prompt."""
    teacher_response_ids: list[int] | None = None
    """The response in the teacher's own tokens (another tokenizer); None: the teacher sees the same ids."""
    student_groups: list[int] | None = None
    """With `teacher_response_ids`: the alignment group of each response token (``data.align``; -1: none)."""
    teacher_groups: list[int] | None = None
    """The same for each of `teacher_response_ids`."""

    def for_teacher(self) -> Encoded:
        """The teacher's view: its own prompt followed by the same response ids (or its own response ids)."""
        assert self.teacher_prompt_ids is not None
        own = self.teacher_response_ids
        response = own if own is not None else self.input_ids[self.n_prompt :]
        return Encoded(self.teacher_prompt_ids + response, len(self.teacher_prompt_ids), self.id)

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.n_prompt + self.input_ids[self.n_prompt :]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt text as the model sees it, up to where the response begins."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (tokenizer.bos_token or "") + PLAIN_PROMPT.format(prompt=prompt)


def render_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, system_prompt: str | None = None
) -> str:
    """The response text including its end-of-turn marker."""
    if getattr(tokenizer, "chat_template", None):
        head = render_prompt(tokenizer, prompt, system_prompt)
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(head):
            raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the dialogue")
        return full[len(head) :]
    return response + (tokenizer.eos_token or "")


def end_of_turn_suffix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a rendered response has after its EOS (a chat template's newline after the end of turn; none
    without a template): what a sampled response that stopped at EOS lacks to be laid out as a training row."""
    ids = tokenizer(render_response(tokenizer, "x", "y"), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids[len(ids) - ids[::-1].index(eos):] if eos in ids else []


def end_of_turn(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> str:
    """What the tokenizer's template writes after a response's text (e.g. ChatML's ``"<|im_end|>\\n"``, else EOS)."""
    return render_response(tokenizer, "", "", system_prompt)


def encode_row(
    tokenizer: PreTrainedTokenizerBase,
    row: dict,
    *,
    max_length: int,
    truncation: str = "response",
    system_prompt: str | None = None,
) -> Encoded:
    """Tokenise one row (and its `ranked_responses`, if any, after the same prompt). Over-long:
    `truncation="response"` cuts the response's end, `"error"` raises."""
    where = row.get("_where", row.get("id", "?"))
    prompt_ids = tokenizer(render_prompt(tokenizer, row["prompt"], system_prompt), add_special_tokens=False)[
        "input_ids"
    ]
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"{where}: field 'prompt' is {len(prompt_ids)} tokens, over data.max_length={max_length} "
            "(no room left for the response)"
        )

    def response_ids(text: str, what: str) -> list[int]:
        ids = tokenizer(render_response(tokenizer, row["prompt"], text, system_prompt), add_special_tokens=False)[
            "input_ids"
        ]
        if len(prompt_ids) + len(ids) > max_length:
            if truncation == "error":
                raise DataError(
                    f"{where}: {what} makes the row {len(prompt_ids) + len(ids)} tokens, "
                    f"over data.max_length={max_length} (set data.truncation=response to cut it)"
                )
            ids = ids[: max_length - len(prompt_ids)]
        return ids

    response = response_ids(row["response"], "field 'response'")
    ranked_ids = None
    if row.get("ranked_responses") is not None:
        ranked_ids = [response_ids(text, "a ranked response") for text in row["ranked_responses"]]
    teacher_prompt_ids = None
    if row.get("teacher_prompt") is not None:  # not limited by max_length: a context is long by nature
        teacher_prompt_ids = tokenizer(render_prompt(tokenizer, row["teacher_prompt"], system_prompt),
                                       add_special_tokens=False)["input_ids"]
    return Encoded(input_ids=prompt_ids + response, n_prompt=len(prompt_ids), id=str(row.get("id", "")),
                   teacher_prompt_ids=teacher_prompt_ids, ranked_ids=ranked_ids)


def with_teacher_tokens(enc: Encoded, row: dict, tokenizer: PreTrainedTokenizerBase,
                        teacher_tokenizer: PreTrainedTokenizerBase, *, system_prompt: str | None = None) -> Encoded:
    """`enc` (the row in the student's tokens) with the row in the teacher's own tokens, aligned.

    The teacher's prompt is rendered with its own chat template (from `teacher_prompt` where the row has
    one), its response is the same text with its own end of turn, cut after the characters the student's
    (possibly truncated) response covers; each side's response tokens get their group of
    :func:`lmdistill.data.align.align_offsets` over the characters both response texts share.
    """
    s_text = render_response(tokenizer, row["prompt"], row["response"], system_prompt)
    t_text = render_response(teacher_tokenizer, row["prompt"], row["response"], system_prompt)
    s_ids, s_offsets = token_offsets(tokenizer, s_text)
    n = len(enc.input_ids) - enc.n_prompt
    if s_ids[:n] != enc.input_ids[enc.n_prompt :]:
        raise DataError(f"{row.get('_where', row.get('id', '?'))}: the student's tokenizer encodes the response "
                        "differently with offsets than without")
    covered = s_offsets[n - 1][1] if n else 0
    t_ids, t_offsets = token_offsets(teacher_tokenizer, t_text)
    keep = sum(1 for start, _ in t_offsets if start < covered)
    s_groups, t_groups = align_offsets(s_offsets[:n], t_offsets[:keep], min(covered, common_prefix(s_text, t_text)))
    prompt = row.get("teacher_prompt") or row["prompt"]
    t_prompt = teacher_tokenizer(render_prompt(teacher_tokenizer, prompt, system_prompt),
                                 add_special_tokens=False)["input_ids"]
    return replace(enc, teacher_prompt_ids=t_prompt, teacher_response_ids=t_ids[:keep], student_groups=s_groups,
                   teacher_groups=t_groups)


def encode_rows(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], *,
                teacher_tokenizer: PreTrainedTokenizerBase | None = None, **kwargs) -> list[Encoded]:
    """Tokenise every row (see :func:`encode_row`); with `teacher_tokenizer` (a teacher with another
    tokenizer), each also in the teacher's tokens (:func:`with_teacher_tokens`)."""
    out = [encode_row(tokenizer, r, **kwargs) for r in rows]
    if teacher_tokenizer is not None:
        out = add_teacher_tokens(out, rows, tokenizer, teacher_tokenizer, system_prompt=kwargs.get("system_prompt"))
    return out


def add_teacher_tokens(encoded: Sequence[Encoded], rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase,
                       teacher_tokenizer: PreTrainedTokenizerBase, *, system_prompt: str | None = None) -> list[Encoded]:
    """Rows already encoded for the student (:func:`encode_rows`), each with the teacher's own tokens added
    (:func:`with_teacher_tokens`)."""
    return [with_teacher_tokens(e, r, tokenizer, teacher_tokenizer, system_prompt=system_prompt)
            for e, r in zip(encoded, rows)]


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each (B, T); plus the same three with prefix
    `teacher_` (B, T') when the examples carry a teacher prompt, and `student_groups` (B, T),
    `teacher_groups` (B, T') (each token's alignment group, -1 elsewhere) when they carry the teacher's
    own tokens; and with ranked responses (K at most per row) the same three with prefix `rank<j>_` for each
    j < K (prompt + the j-th ranked response; a row with fewer repeats its last) and `ranked_mask` (B, K)
    bool, the ranked responses each row has."""
    with_ranked = [e.ranked_ids is not None for e in examples]
    if any(with_ranked):
        if not all(with_ranked) or not all(e.ranked_ids for e in examples):
            raise ValueError("either every example of a batch has ranked responses (at least one) or none has")
        out = collate([replace(e, ranked_ids=None) for e in examples], pad_id)
        K = max(len(e.ranked_ids) for e in examples)
        for j in range(K):
            ranked = [Encoded(e.input_ids[: e.n_prompt] + e.ranked_ids[min(j, len(e.ranked_ids) - 1)], e.n_prompt, e.id)
                      for e in examples]
            out.update({f"rank{j}_{k}": v for k, v in collate(ranked, pad_id).items()})
        out["ranked_mask"] = torch.tensor([[j < len(e.ranked_ids) for j in range(K)] for e in examples])
        return out
    with_teacher = [e.teacher_prompt_ids is not None for e in examples]
    if any(with_teacher):
        if not all(with_teacher):
            raise ValueError("either every example of a batch has a teacher prompt or none has")
        plain = [Encoded(e.input_ids, e.n_prompt, e.id) for e in examples]
        views = [e.for_teacher() for e in examples]
        out = {**collate(plain, pad_id), **{"teacher_" + k: v for k, v in collate(views, pad_id).items()}}
        if examples[0].student_groups is not None:
            out["student_groups"] = _groups([(e.n_prompt, e.student_groups) for e in examples], out["input_ids"])
            out["teacher_groups"] = _groups([(v.n_prompt, e.teacher_groups) for v, e in zip(views, examples)],
                                            out["teacher_input_ids"])
        return out
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _groups(rows: Sequence[tuple[int, list[int] | None]], like: torch.Tensor) -> torch.Tensor:
    """(B, T) long: each row's response-token groups from its prompt length on, -1 elsewhere."""
    out = torch.full_like(like, -1)
    for i, (start, groups) in enumerate(rows):
        if groups is None:
            raise ValueError("either every example of a batch carries the teacher's own tokens or none does")
        out[i, start : start + len(groups)] = torch.tensor(groups, dtype=torch.long)
    return out


def collate_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: input_ids, attention_mask (B, T)."""
    T = max(len(p) for p in prompt_ids)
    B = len(prompt_ids)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        input_ids[i, T - len(p) :] = torch.tensor(list(p))
        attention_mask[i, T - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def response_token_count(labels: torch.Tensor) -> int:
    """Number of trained tokens in a batch: label positions 1.. that are not ignored (after the shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
