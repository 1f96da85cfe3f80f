"""Scoring a given sequence through ``/completions``: what both dialects share, and the echo dialect.

:class:`Scorer` turns rows of (position, log-prob) and (position, top-k) into the (B, T) scores and
(B, T, k) top-k of the teacher protocol; a dialect supplies :meth:`Scorer.one`, one sequence's
request and the reading of its answer. vLLM's dialect (``prompt_logprobs``) is in
:mod:`.prompt_logprobs`; the echo dialect (llama.cpp, the OpenAI API) is here.

Echo: ``echo: true, logprobs: k, max_tokens: 1``. The prompt's own log-probs come back with the one
generated token (``max_tokens: 0`` makes llama-cpp-python generate to the end of its context). The
sequence is sent as a list of token ids when the server accepts that, so positions align exactly;
otherwise as the decoded text, and the server's echoed tokens are checked against ours, position by
position (:class:`ScoreAlignmentError` if the server tokenised the text differently).

How a server echoes (:class:`Echo`) is found by the probe (:mod:`.probe`): ``exact`` pairs echoed
token t with log p(t | tokens before t); ``after_bos`` is llama-cpp-python 0.3.36's reading, right
only for sequences that start with BOS: it drops the leading BOS, reports no log-prob for the token
after it, and drops every later token whose id is the BOS id. Those positions are NaN here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from lmdistill.io import UserError
from lmdistill.losses import TopK
from lmdistill.teachers.server.tokens import TokenMap, decode
from lmdistill.teachers.server.transport import Transport


class ScoreAlignmentError(UserError, ValueError):
    """The server's echoed tokens cannot be matched to the sequence sent, position by position."""


def completion_entries(response: dict) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
    """(tokens, token_logprobs, top_logprobs) of a legacy /completions response's first choice."""
    lp = (response.get("choices") or [{}])[0].get("logprobs") or {}
    tokens = list(lp.get("tokens") or [])
    return tokens, list(lp.get("token_logprobs") or [None] * len(tokens)), list(lp.get("top_logprobs") or [None] * len(tokens))


def completion_tokens(response: dict) -> int:
    """Tokens the server says it generated (1 when it does not say)."""
    return int((response.get("usage") or {}).get("completion_tokens", 1))


def echoed_positions(ids: list[int], mode: str, bos: int | None) -> list[int]:
    """Indices into `ids` of the prompt entries the server echoes (all, or all but BOS-id tokens)."""
    if mode == "exact":
        return list(range(len(ids)))
    return [j for j in range(len(ids)) if ids[j] != bos]


@dataclass(frozen=True)
class Echo:
    """How a server echoes prompts, as the probe found it."""

    mode: str
    """``exact`` or ``after_bos`` (module docstring)."""
    prompt_ids: bool
    """Whether it takes the prompt as a list of token ids."""


@dataclass
class Row:
    """What the server gave for one sequence, at positions of the (B, T) batch."""

    scores: list[tuple[int, float]] = field(default_factory=list)
    """(position t, log p(token t | tokens before t))"""
    tops: list[tuple[int, list[tuple[int | None, float]]]] = field(default_factory=list)
    """(position t, the server's (id, log-prob) pairs for the token after t; id None: a string with no id)"""


class Scorer:
    """Scores and top-k of given sequences from a server; a dialect implements :meth:`one` (module docstring)."""

    def __init__(self, transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase,
                 token_map: TokenMap) -> None:
        self.transport, self.model, self.tokenizer, self.token_map = transport, model, tokenizer, token_map

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log-prob of each token given its prefix; position 0 and padding 0, unscored positions NaN."""
        out = torch.zeros(input_ids.shape, dtype=torch.float32)  # (B, T)
        for b, row in enumerate(self.rows(input_ids, attention_mask, k=1)):
            for t, lp in row.scores:
                out[b, t] = lp
        return out.to(input_ids.device)

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> TopK:
        """Top-k (B, T, k) of the next token at every position; rows not given are filled by
        :meth:`TokenMap.topk_ids_row`."""
        B, T = input_ids.shape
        rows = self.rows(input_ids, attention_mask, k=k)
        fill_ids, fill_lps = self.token_map.topk_ids_row([], k)
        ids = torch.tensor(fill_ids, dtype=torch.long).repeat(B, T, 1)  # (B, T, k)
        lps = torch.tensor(fill_lps, dtype=torch.float32).repeat(B, T, 1)  # (B, T, k)
        for b, row in enumerate(rows):
            for t, top in row.tops:
                row_ids, row_lps = self.token_map.topk_ids_row(top, k)
                ids[b, t], lps[b, t] = torch.tensor(row_ids), torch.tensor(row_lps)
        return TopK(ids=ids.to(input_ids.device), logprobs=lps.to(input_ids.device))

    def rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> list[Row]:
        """One request per row (concurrently), mapped back to positions of the (B, T) batch."""
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be (B, T)")
        rows = []
        for b in range(input_ids.shape[0]):
            where = attention_mask[b].nonzero().flatten().tolist()
            rows.append((where, input_ids[b, where].tolist()))
        return self.transport.map(lambda row: self.one(row[0], row[1], k), rows)

    def one(self, where: list[int], ids: list[int], k: int) -> Row:
        """Score one sequence `ids` found at batch positions `where`, with the server's top-k (k >= 1)."""
        raise NotImplementedError


class EchoScorer(Scorer):
    """The echo dialect (module docstring), as the probe found it (`echo`)."""

    def __init__(self, transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase, token_map: TokenMap,
                 echo: Echo) -> None:
        super().__init__(transport, model, tokenizer, token_map)
        self.echo = echo

    def one(self, where: list[int], ids: list[int], k: int) -> Row:
        row = Row()
        if len(ids) < 2:
            return row
        url, mode, bos = self.transport.base_url, self.echo.mode, self.tokenizer.bos_token_id
        if mode == "after_bos" and ids[0] != bos:
            raise ScoreAlignmentError(
                f"{url} pairs echoed log-probs with the right tokens only for sequences that start with "
                f"the BOS token {self.tokenizer.bos_token!r} (id {bos}) (llama-cpp-python's behaviour, see "
                f"lmdistill.teachers.server.scoring); this one starts with id {ids[0]}")
        prompt = ids if self.echo.prompt_ids else decode(self.tokenizer, ids)
        out = self.transport.request("POST", "/completions", {"model": self.model, "prompt": prompt, "max_tokens": 1,
                                                              "temperature": 0.0, "logprobs": k, "echo": True})
        tokens, lps, tops = completion_entries(out)
        echoed = echoed_positions(ids, mode, bos)  # the index j in `ids` of every echoed prompt entry
        n_prompt = len(echoed)
        if not n_prompt <= len(tokens) <= n_prompt + completion_tokens(out):
            raise ScoreAlignmentError(
                f"{url} echoed {len(tokens)} tokens for a sequence of {len(ids)} tokens and "
                f"{completion_tokens(out)} generated (expected {n_prompt} echoed): the server tokenised it differently")
        if not self.echo.prompt_ids:
            self._check_tokens(ids, echoed, tokens[:n_prompt])
        for e, j in enumerate(echoed):
            if j == 0:
                continue
            row.scores.append((where[j], math.nan if lps[e] is None else float(lps[e])))
            if tops[e]:
                row.tops.append((where[j - 1], self._ids(tops[e])))
        if mode == "after_bos":
            row.scores += [(where[j], math.nan) for j in range(1, len(ids)) if ids[j] == bos]
        if n_prompt < len(tokens) and tops[n_prompt]:
            row.tops.append((where[-1], self._ids(tops[n_prompt])))
        return row

    def _ids(self, top: dict[str, float]) -> list[tuple[int | None, float]]:
        return [(self.token_map.parse(token), lp) for token, lp in top.items()]

    def _check_tokens(self, ids: list[int], mine: list[int], tokens: list[str]) -> None:
        for j, token in zip(mine, tokens):
            if not self.token_map.same_token(token, ids[j]):
                raise ScoreAlignmentError(
                    f"{self.transport.base_url} tokenised the decoded sequence differently: at position {j} it has "
                    f"{token!r}, the teacher tokenizer {self.token_map.texts[ids[j]]!r} (id {ids[j]}); scores would "
                    "be misaligned")
