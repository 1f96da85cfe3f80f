"""vLLM's dialect: a given sequence scored through ``/completions`` with ``prompt_logprobs``, by id.

What vLLM sends and takes, read from its source (vllm/entrypoints/openai/completion/protocol.py:
``CompletionRequest``, ``CompletionResponseChoice``; completion/serving.py:
``request_output_to_completion_response``, ``_create_completion_logprobs``; vllm/v1/engine/logprobs.py:
``_make_logprob_dict``; vllm/entrypoints/generate/base/serving.py: ``format_token_id_placeholder``,
``clamp_prompt_logprobs``):

- ``prompt`` may be a list of token ids; they are used as they are (no BOS is added to them).
- ``prompt_logprobs: k`` puts ``choices[0].prompt_logprobs`` in the answer: one entry per prompt
  token, ``null`` for the first, then for token t an object keyed by token id (a JSON key, so a
  string) whose values are ``{"logprob": float, "rank": int, "decoded_token": str}``: the prompt's
  own token t (rank: its rank in the vocabulary, from 1) and the k most likely (ranks 1..k), so k
  or k + 1 entries. A log-prob of -inf is sent as -9999.0.
- ``logprobs: k`` gives the generated tokens the legacy OpenAI ``logprobs`` object (``tokens``,
  ``token_logprobs``, ``top_logprobs`` with up to k + 1 entries: the sampled token is always there);
  with ``return_tokens_as_token_ids: true`` every token in it is written ``"token_id:N"``.
- k above the server's ``--max-logprobs`` (20 by default) is refused with HTTP 400 (so a run's
  ``teacher.k``, 64 when 0, must be at most that).
- Prompt log-probs and prefix caching: early V1 engines refused a request with ``prompt_logprobs``
  while prefix caching was on (``--no-enable-prefix-caching`` was needed; vllm issue #13409); later
  ones skip the cache for such requests (vllm PR #17251, docs PR #23399).

Here, for a sequence of n tokens sent as ids with ``max_tokens: 1``: the score of token t (t ≥ 1) is
the log-prob of the prompt's own entry; the top-k row of position t − 1 is the entries of rank ≤ k
(the prompt's own token, when ranked below k, is not one of them: its mass is in the tail, which the
losses take as 1 − Σ top-k); the row of position n − 1 is the one generated token's ``top_logprobs``
(the same next-token distribution, read from ``logprobs``). Ids come back as ids: no token string is
mapped back (:class:`~.tokens.TokenMap` reads ``token_id:N``, or a string where the server ignores
``return_tokens_as_token_ids``). An answer without these shapes raises :class:`ServerResponseError`,
naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lmdistill.teachers.server.scoring import Row, Scorer, completion_entries
from lmdistill.teachers.server.tokens import TokenMap
from lmdistill.teachers.server.transport import ServerError, ServerResponseError, Transport

Entry = dict[int, tuple[float, int | None]]
"""One prompt position: token id → (log-prob, rank in the vocabulary or None where not given)."""


@dataclass(frozen=True)
class PromptLogprobs:
    """A server that scores prompts with ``prompt_logprobs`` (vLLM), as the probe found it."""

    token_ids: bool
    """Whether it writes generated tokens as ``token_id:N`` (``return_tokens_as_token_ids``)."""


def request(ids: list[int], *, k: int, max_tokens: int = 1) -> dict:
    """The body (less ``model``) that scores `ids` with top-`k` prompt and generated log-probs, greedily."""
    return {"prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "prompt_logprobs": k, "logprobs": k,
            "return_tokens_as_token_ids": True}


def prompt_entries(response: dict, n: int, vocab_size: int, url: str) -> list[Entry | None]:
    """``choices[0].prompt_logprobs`` of an answer for a prompt of `n` tokens, checked and read.

    Entry 0 is None (no log-prob for the first token). Raises :class:`ServerResponseError` when
    the field is missing, not as long as the prompt, or an entry is not an object of
    ``{"<id>": {"logprob": number, "rank": int}}`` with ids in [0, `vocab_size`).
    """
    where = f"{url}/completions answered"
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerResponseError(f"{where} without choices[0]")
    raw = choices[0].get("prompt_logprobs")
    if not isinstance(raw, list):
        raise ServerResponseError(f"{where} without choices[0].prompt_logprobs (a list; got {type(raw).__name__}): "
                                  "not vLLM's dialect")
    if len(raw) != n:
        raise ServerResponseError(f"{where} choices[0].prompt_logprobs of {len(raw)} entries for a prompt of {n} "
                                  "tokens (one per prompt token expected)")
    entries: list[Entry | None] = [None]
    for t in range(1, n):
        field = f"choices[0].prompt_logprobs[{t}]"
        if not isinstance(raw[t], dict) or not raw[t]:
            raise ServerResponseError(f"{where} {field} = {raw[t]!r:.80}, not an object of token id -> log-prob")
        entry: Entry = {}
        for key, value in raw[t].items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ServerResponseError(f"{where} {field} keyed by {key!r}, not a token id")
            i = int(key)
            if i >= vocab_size:
                raise ServerResponseError(f"{where} token id {i} in {field}, outside the teacher tokenizer's "
                                          f"{vocab_size} ids: is teacher.model the served model's tokenizer?")
            lp = value.get("logprob") if isinstance(value, dict) else None
            rank = value.get("rank") if isinstance(value, dict) else None
            if not _is_number(lp):
                raise ServerResponseError(f"{where} {field}[{key!r}] = {value!r:.80}, not "
                                          '{"logprob": a number, ...}')
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise ServerResponseError(f"{where} {field}[{key!r}] has rank {rank!r}, not an integer >= 1")
            entry[i] = (float(lp), rank)
        entries.append(entry)
    return entries


def top_of(entry: Entry, k: int) -> list[tuple[int | None, float]]:
    """The k most likely (id, log-prob) of an entry, best first: those ranked 1..k where every rank
    is given, else the k highest log-probs."""
    pairs = entry.items()
    if all(rank is not None for _, rank in entry.values()):
        pairs = [(i, (lp, rank)) for i, (lp, rank) in pairs if rank <= k]
    return sorted(((i, lp) for i, (lp, _) in pairs), key=lambda p: -p[1])[:k]


def generated(response: dict, token_map: TokenMap, url: str) -> tuple[list[int | None], list[float | None],
                                                                         list[list[tuple[int | None, float]]]]:
    """(ids, log-probs, top (id, log-prob) pairs) of the generated tokens in ``choices[0].logprobs``
    (:func:`~.scoring.completion_entries`, checked).

    A token is read by :meth:`TokenMap.parse` (``token_id:N``, or a string); one it cannot read is
    None. Empty lists when the answer has no ``logprobs``; :class:`ServerResponseError` when they
    are not the legacy OpenAI shape.
    """
    choices = response.get("choices")
    lp = choices[0].get("logprobs") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    if lp is None:
        return [], [], []
    tokens, lps, tops = (lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")) if isinstance(lp, dict) \
        else (None, None, None)
    if not (isinstance(tokens, list) and isinstance(lps, list) and len(lps) == len(tokens)
            and (tops is None or isinstance(tops, list) and len(tops) == len(tokens))
            and all(v is None or _is_number(v) for v in lps)
            and all(top is None or isinstance(top, dict) and all(_is_number(v) for v in top.values())
                    for top in tops or [])):
        raise ServerResponseError(f"{url}/completions answered choices[0].logprobs = {lp!r:.120}, not the OpenAI "
                                  "shape (equally long lists tokens, token_logprobs (numbers), top_logprobs (objects))")
    tokens, lps, tops = completion_entries(response)
    return ([token_map.parse(str(s)) for s in tokens], lps,
            [[(token_map.parse(str(s)), float(v)) for s, v in (top or {}).items()] for top in tops])


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


class PromptLogprobsScorer(Scorer):
    """Scores and top-k of given sequences through vLLM's ``prompt_logprobs`` (module docstring)."""

    def __init__(self, transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase, token_map: TokenMap,
                 dialect: PromptLogprobs) -> None:
        super().__init__(transport, model, tokenizer, token_map)
        self.dialect = dialect

    def one(self, where: list[int], ids: list[int], k: int) -> Row:
        row = Row()
        if len(ids) < 2:
            return row
        url = self.transport.base_url
        try:
            out = self.transport.request("POST", "/completions", {"model": self.model, **request(ids, k=k)})
        except ServerError as e:
            if type(e) is ServerError and "max allowed" in str(e):  # vLLM's "... greater than max allowed: 20"
                raise ServerError(f"{e} (k={k} is above the server's --max-logprobs, 20 unless set: start vLLM with "
                                  f"--max-logprobs {k} or lower teacher.k)") from e
            raise
        entries = prompt_entries(out, len(ids), self.token_map.vocab_size, url)
        for t in range(1, len(ids)):
            entry = entries[t]
            assert entry is not None
            if ids[t] not in entry:
                raise ServerResponseError(f"{url}/completions answered choices[0].prompt_logprobs[{t}] without the "
                                          f"prompt's own token {ids[t]} (ids: {sorted(entry)[:8]})")
            row.scores.append((where[t], entry[ids[t]][0]))
            row.tops.append((where[t - 1], top_of(entry, k)))
        _, _, tops = generated(out, self.token_map, url)
        if tops and tops[0]:
            row.tops.append((where[-1], sorted(tops[0], key=lambda p: -p[1])[:k]))
        return row
