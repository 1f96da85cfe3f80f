"""Token strings, as servers return them, mapped to the teacher tokenizer's ids.

llama.cpp and the OpenAI API return tokens as strings. vLLM returns ``token_id:N`` instead when
asked to (``return_tokens_as_token_ids``): :meth:`TokenMap.parse` reads that form as id N and
maps every other string. :class:`TokenMap` maps a string to the id
whose single-token decoding is that string (and, for SentencePiece vocabularies, the piece with
``▁`` read as a space). Limits: a string that several ids decode to maps to no id: incomplete
UTF-8 byte tokens (llama.cpp renders them with the bytes dropped) and the empty string (llama.cpp
renders every special token as ""; a server that writes ``<|im_end|>`` out is mapped). A server
that keys top log-probs by string (llama.cpp's ``/completions``) has already merged such ids.
Top-k slots left without an id are filled by :meth:`TokenMap.topk_row` (see there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

TOKEN_ID = re.compile(r"token_id:(\d+)")
"""vLLM's rendering of a token under ``return_tokens_as_token_ids`` (``format_token_id_placeholder``
in vllm/entrypoints/generate/base/serving.py: ``f"token_id:{token_id}"``)."""


class TokenMap:
    """Maps token strings (as servers return them) to a tokenizer's ids; see the module docstring."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.vocab_size = len(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        texts = tokenizer.batch_decode([[i] for i in range(self.vocab_size)], clean_up_tokenization_spaces=False)
        pieces = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        self.texts: list[str] = texts
        self.pieces: list[str] = pieces
        owners: dict[str, set[int]] = {}
        for i, (text, piece) in enumerate(zip(texts, pieces)):
            owners.setdefault(text, set()).add(i)
            if isinstance(piece, str) and piece.startswith("▁"):  # SentencePiece: llama.cpp keeps the space
                owners.setdefault(piece.replace("▁", " "), set()).add(i)
        self._ids = {s: next(iter(ids)) for s, ids in owners.items() if len(ids) == 1 and s and "\ufffd" not in s}

    def id(self, token: str) -> int | None:
        """The unique id whose decoding is `token`, else None."""
        return self._ids.get(token)

    def parse(self, token: str) -> int | None:
        """The id a server's `token` stands for: N for vLLM's ``token_id:N`` (when N is in the
        vocabulary), else :meth:`id`."""
        if match := TOKEN_ID.fullmatch(token):
            i = int(match.group(1))
            return i if i < self.vocab_size else None
        return self.id(token)

    def same_token(self, token: str, i: int) -> bool:
        """Whether the server's `token` is a rendering of id `i` (or cannot tell: a special or byte token)."""
        ours = self.texts[i]
        if i in self.special or not token or "\ufffd" in ours or token == ours:
            return True
        return token.replace(" ", "▁") == self.pieces[i]

    def topk_row(self, top: Sequence[tuple[str, float]], k: int) -> tuple[list[int], list[float]]:
        """k (ids, log-probs) of one position from the server's (string, log-prob) pairs, each string
        read by :meth:`parse`; as :meth:`topk_ids_row`."""
        return self.topk_ids_row([(self.parse(token), lp) for token, lp in top], k)

    def topk_ids_row(self, top: Sequence[tuple[int | None, float]], k: int) -> tuple[list[int], list[float]]:
        """k (ids, log-probs) of one position from the server's (id, log-prob) pairs (id None: a
        string with no unique id).

        The k best pairs with an id are kept, best first. Missing slots (fewer than k pairs
        with an id, or a position with none) get ids not listed, each holding an equal share of the
        unlisted mass: log((1 − Σ p_listed) / (V − n_listed)), where "listed" counts every pair, with
        an id or not. That is the uniform-tail guess: finite (so no divergence sees log 0), and in
        practice below every listed log-prob. Fill ids are the smallest non-special ids not listed.
        """
        if not 1 <= k <= self.vocab_size - len(self.special):
            raise ValueError(f"k must be in [1, {self.vocab_size - len(self.special)}], got {k}")
        best: dict[int, float] = {}
        for i, lp in sorted(top, key=lambda p: -p[1]):
            if i is not None and i not in best and len(best) < k:
                best[i] = float(lp)
        ids, lps = list(best), list(best.values())
        if len(ids) < k:
            listed = {i for i, _ in top} | set(ids)
            mass = min(sum(math.exp(lp) for _, lp in top), 1.0)
            n_unlisted = max(self.vocab_size - len(top), 1)
            fill = math.log(max(1.0 - mass, 1e-12) / n_unlisted)
            candidate = 0
            while len(ids) < k:  # special ids are skipped: they are what unmapped "" entries usually are
                if candidate not in listed and candidate not in self.special:
                    ids.append(candidate)
                    lps.append(fill)
                candidate += 1
        return ids, lps


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """`text`'s ids, with no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """`ids` as text, special tokens written out and spaces untouched (what a server re-tokenises)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
