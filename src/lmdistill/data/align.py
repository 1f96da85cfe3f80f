"""Two tokenizations of one text, aligned by character offsets (cross-tokenizer distillation).

A student and a teacher with different tokenizers split the same response text into different
tokens. Walking both token lists by their end offsets (the fast tokenizers' offset mappings), a
*group* closes wherever both sides have a token ending at the same character, and no further token
ends there (a character split into several byte-level tokens stays in one group): the group's tokens
on one side cover the same characters as its tokens on the other. A group with one token on each
side is a one-to-one pair (the same text span, e.g. ``" the"`` and ``" the"``); any other is a merged
span (``"12"`` against ``"1"``, ``"2"``). The same walk as TRL's GOLD trainer (its "alignment groups").

Tokens past the characters both texts share (the two templates end a turn differently, or one side
was cut by ``data.max_length``) belong to no group (-1).

The vocabularies are mapped by the text of each token (:func:`vocabulary_map`): a student id and a
teacher id are paired when both decode to the same bytes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

Offsets = Sequence[tuple[int, int]]


def token_offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character (start, end) of each token) of `text`, no special tokens added (a fast tokenizer's
    offset mapping)."""
    if not tokenizer.is_fast:
        raise ValueError(f"cross-tokenizer alignment needs a fast tokenizer (offset mappings); "
                         f"{type(tokenizer).__name__} is not one")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    return len(os.path.commonprefix([a, b]))


def align_offsets(student: Offsets, teacher: Offsets, limit: int) -> tuple[list[int], list[int]]:
    """Group index of every token on each side (-1: in no group), groups numbered 0, 1, ... in text order.

    `student`, `teacher`: the (start, end) character offsets of each side's tokens of one text, in
    order; `limit`: characters up to which the two texts agree (a group must end at or before it).
    Group g holds the student tokens i with ``s[i] == g`` and the teacher tokens j with ``t[j] == g``;
    both cover the same characters.
    """
    s_group, t_group = [-1] * len(student), [-1] * len(teacher)
    i = j = s_start = t_start = g = 0
    while i < len(student) and j < len(teacher):
        s_end, t_end = student[i][1], teacher[j][1]
        if min(s_end, t_end) > limit:
            break
        if s_end < t_end:
            i += 1
        elif t_end < s_end:
            j += 1
        else:
            # Tokens that end on the same character (parts of one multi-byte character) stay together.
            while i + 1 < len(student) and student[i + 1][1] == s_end:
                i += 1
            while j + 1 < len(teacher) and teacher[j + 1][1] == t_end:
                j += 1
            i, j = i + 1, j + 1
            s_group[s_start:i] = [g] * (i - s_start)
            t_group[t_start:j] = [g] * (j - t_start)
            s_start, t_start, g = i, j, g + 1
    return s_group, t_group


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's vocabulary is GPT-2 byte-level (each byte written as one printable character)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> dict[bytes, int]:
    """The bytes each token of the vocabulary stands for → its id, for the tokens whose bytes are unique.

    Byte-level vocabularies (GPT-2, Llama 3, Qwen, SmolLM2) are mapped back through the byte table;
    SentencePiece-style ones read ``▁`` as a space and ``<0xNN>`` as byte NN; special and added tokens
    stand for their own text. Tokens that two ids share (after this reading) are left out.
    """
    byte_level = _byte_level(tokenizer)
    added = set(tokenizer.get_added_vocab())
    seen: dict[bytes, int] = {}
    clashes: set[bytes] = set()
    for token, i in tokenizer.get_vocab().items():
        if token in added:
            raw = token.encode()
        elif byte_level:
            if any(c not in _UNICODE_TO_BYTE for c in token):
                continue
            raw = bytes(_UNICODE_TO_BYTE[c] for c in token)
        else:
            m = _BYTE_TOKEN.fullmatch(token)
            raw = bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode()
        if raw in seen:
            clashes.add(raw)
        seen[raw] = i
    return {raw: i for raw, i in seen.items() if raw not in clashes}


def vocabulary_map(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(student ids, teacher ids) of the tokens both vocabularies hold (the same bytes, :func:`token_bytes`),
    in the order of the student's ids."""
    s, t = token_bytes(student), token_bytes(teacher)
    pairs = sorted((i, t[raw]) for raw, i in s.items() if raw in t)
    return [p[0] for p in pairs], [p[1] for p in pairs]
