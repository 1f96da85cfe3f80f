"""A teacher behind an OpenAI-compatible HTTP server: llama.cpp, vLLM, or a provider.

Endpoints used (``base_url`` ends with ``/v1``): ``GET /models``, ``POST /completions``,
``POST /chat/completions``. Every request has a timeout; connection errors, timeouts, HTTP 429
and 5xx are retried with exponential backoff (``backoff · 2^attempt`` seconds, or the server's
``Retry-After``, at most ``max_backoff``), up to ``max_retries`` times; other 4xx fail at once.
Batches run on a thread pool of ``concurrency`` workers. The API key is read from the
environment variable named by ``api_key_env`` and sent as ``Authorization: Bearer``; it never
appears in a repr, an error message or a log line.

What the server gives is found by :meth:`ServerTeacher.probe` (once, on first use of
``capability``):

- ``text``: :meth:`~ServerTeacher.generate`; :meth:`~ServerTeacher.topk_of_generation` when the
  server returns log-probs of generated tokens.
- ``token`` / ``topk``: :meth:`~ServerTeacher.score` and :meth:`~ServerTeacher.topk` of a given
  sequence, through ``/completions`` with ``echo: true, logprobs: k, max_tokens: 1`` (the prompt's
  own log-probs come back with the one generated token; ``max_tokens: 0`` makes llama-cpp-python
  generate to the end of its context). Needs a ``tokenizer`` (the teacher's own). The sequence is
  sent as a list of token ids when the server accepts that (vLLM does), so positions align exactly;
  otherwise as the decoded text, and the server's echoed tokens are checked against ours, position by
  position (:class:`ScoreAlignmentError` if the server tokenised the text differently).

  The probe also checks that echoed log-probs are *aligned*: it asks for the greedy next token ``g``
  of a prompt, then scores ``prompt + g`` and requires the echoed log-prob of ``g`` to equal the one
  generation reported (within ``ALIGN_TOL``). llama-cpp-python 0.3.36 (its server accepts only text
  prompts) passes only when the sequence starts with the BOS token: it drops a leading BOS and pairs
  every other token with the right prediction, but with no leading BOS it pairs token t with the
  prediction *for* t + 1 (off by one). It also reports no log-prob for the first token after that BOS
  and drops every later token whose id is the BOS id (SmolLM2's ``<|im_start|>`` is its BOS). So with
  such a server :meth:`score` accepts only sequences that start with BOS, and the positions it cannot
  score (the one after BOS, later BOS-id tokens) are NaN — they are prompt tokens in chat data.

Token strings → ids: llama.cpp and the OpenAI API return tokens as strings. :class:`TokenMap` maps a
string to the id whose single-token decoding is that string (and, for SentencePiece vocabularies,
the piece with ``▁`` read as a space). Limits: a string that several ids decode to maps to no id:
incomplete UTF-8 byte tokens (llama.cpp renders them with the bytes dropped) and the empty string
(llama.cpp renders every special token as ""; a server that writes ``<|im_end|>`` out is mapped).
A server that keys top log-probs by string (llama.cpp's ``/completions``) has already merged such
ids. Top-k slots left without an id are filled by :meth:`TokenMap.topk_row` (see there).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from lmdistill.losses import TopK
from lmdistill.teachers.base import Capability, CapabilityError

log = logging.getLogger(__name__)

R = TypeVar("R")

ALIGN_TOL = 0.1
"""Largest |echoed − generated| log-prob (nats) of the same token accepted as aligned. llama.cpp
evaluates a prompt in batches and a generated token alone, and its quantised kernels differ between
the two by ~0.02 nats on SmolLM2 Q4_1; a misaligned echo is off by nats."""

PROBE_TEXTS = ("The capital of France is", "1, 2, 3, 4, 5, 6,")


class ServerError(RuntimeError):
    """A request failed. ``completed`` holds the results finished before the failure, by index."""

    def __init__(self, message: str, *, completed: dict[int, Any] | None = None) -> None:
        super().__init__(message)
        self.completed: dict[int, Any] = completed or {}


class ServerUnavailable(ServerError):
    """Retries exhausted on connection errors, timeouts, 429 or 5xx."""


class ServerTimeout(ServerUnavailable):
    """Retries exhausted and the last attempt timed out."""


class ScoreAlignmentError(ValueError):
    """The server's echoed tokens cannot be matched to the sequence sent, position by position."""


class _Retryable(Exception):
    def __init__(self, reason: str, *, timeout: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.timeout = timeout
        self.retry_after = retry_after


class _HTTPStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


@dataclass
class ServedGeneration:
    """One generation with the server's log-probs of each generated token.

    tokens: the generated tokens as the server renders them (strings), length N.
    logprobs: log-prob of each generated token, length N.
    top: per token, the server's top-k alternatives as (string, log-prob), best first.
    ids / top_ids: the same mapped to the teacher tokenizer's ids (None where no unique id; both
        None when the teacher has no tokenizer).
    """

    text: str
    tokens: list[str]
    logprobs: list[float]
    top: list[list[tuple[str, float]]]
    finish_reason: str | None = None
    ids: list[int | None] | None = None
    top_ids: list[list[int | None]] | None = None
    _map: TokenMap | None = field(default=None, repr=False)

    def to_topk(self, k: int) -> TopK:
        """TopK (N, k) of the generated positions: row i is the distribution token i was drawn from.

        Unlike the protocol's ``topk`` (row t predicts token t + 1) this is aligned with ``tokens``.
        Slots with no unique id are filled as :meth:`TokenMap.topk_row` describes.
        """
        if self._map is None:
            raise CapabilityError("top-k ids need the teacher's tokenizer (ServerTeacher(tokenizer=...))")
        rows = [self._map.topk_row(top, k) for top in self.top]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).view(len(rows), k)
        lps = torch.tensor([r[1] for r in rows], dtype=torch.float32).view(len(rows), k)
        return TopK(ids=ids, logprobs=lps)


@dataclass
class _EchoRow:
    scores: list[tuple[int, float]] = field(default_factory=list)
    """(position t, log p(token t | tokens before t))"""
    tops: list[tuple[int, list[tuple[str, float]]]] = field(default_factory=list)
    """(position t, the server's (string, log-prob) pairs for the token after t)"""


class TokenMap:
    """Maps token strings (as servers return them) to a tokenizer's ids; see the module docstring."""

    def __init__(self, tokenizer: Any) -> None:
        self.vocab_size = len(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        texts = tokenizer.batch_decode([[i] for i in range(self.vocab_size)], clean_up_tokenization_spaces=False)
        pieces = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        self.texts: list[str] = texts
        owners: dict[str, set[int]] = {}
        for i, (text, piece) in enumerate(zip(texts, pieces)):
            owners.setdefault(text, set()).add(i)
            if isinstance(piece, str) and piece.startswith("▁"):  # SentencePiece: llama.cpp keeps the space
                owners.setdefault(piece.replace("▁", " "), set()).add(i)
        self._ids = {s: next(iter(ids)) for s, ids in owners.items() if len(ids) == 1 and s and "\ufffd" not in s}

    def id(self, token: str) -> int | None:
        """The unique id whose decoding is `token`, else None."""
        return self._ids.get(token)

    def topk_row(self, top: Sequence[tuple[str, float]], k: int) -> tuple[list[int], list[float]]:
        """k (ids, log-probs) of one position from the server's (string, log-prob) pairs.

        The k best pairs with a unique id are kept, best first. Missing slots (fewer than k pairs
        with an id, or a position with none) get ids not listed, each holding an equal share of the
        unlisted mass: log((1 − Σ p_listed) / (V − n_listed)), where "listed" counts every pair, with
        an id or not. That is the uniform-tail guess: finite (so no divergence sees log 0), and in
        practice below every listed log-prob. Fill ids are the smallest non-special ids not listed.
        """
        if not 1 <= k <= self.vocab_size - len(self.special):
            raise ValueError(f"k must be in [1, {self.vocab_size - len(self.special)}], got {k}")
        best: dict[int, float] = {}
        for token, lp in sorted(top, key=lambda p: -p[1]):
            i = self.id(token)
            if i is not None and i not in best and len(best) < k:
                best[i] = float(lp)
        ids, lps = list(best), list(best.values())
        if len(ids) < k:
            listed = {self.id(t) for t, _ in top} | set(ids)
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


class ServerTeacher:
    """A teacher served over an OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``).

    Args:
        base_url: e.g. ``http://127.0.0.1:8080/v1``.
        model: the model name sent with every request.
        api_key_env: environment variable holding the API key (read once, here; may be unset).
        tokenizer: the teacher's own tokenizer. Needed for ``score``/``topk`` (TOKEN/TOPK) and to
            map returned token strings to ids; without it the teacher gives TEXT only.
        timeout: seconds per HTTP request (connect and read).
        max_retries: retries after the first attempt, on connection errors, timeouts, 429 and 5xx.
        backoff: first retry delay in seconds, doubled every retry (capped at ``max_backoff``).
        concurrency: requests in flight at once for a batch.
        chat: generate through ``/chat/completions`` (the server applies its chat template);
            otherwise through ``/completions`` with the prompt rendered by ``tokenizer``'s template.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", tokenizer: Any = None,
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 0.5, concurrency: int = 4,
                 chat: bool = False, max_backoff: float = 30.0) -> None:
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("ServerTeacher: need concurrency >= 1, max_retries >= 0, timeout > 0, backoff >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"server:{model}"
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        self.tokenizer = tokenizer
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.concurrency = concurrency
        self.chat = chat
        self.features: dict[str, Any] | None = None
        self._capability: Capability | None = None
        self._probe_lock = threading.Lock()
        self._token_map: TokenMap | None = None
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # Proxies from the environment apply to remote servers, never to loopback.
        proxies = {} if host in ("localhost", "127.0.0.1", "::1") else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        cap = str(self._capability) if self._capability is not None else "not probed"
        return (f"ServerTeacher(base_url={self.base_url!r}, model={self.model!r}, capability={cap}, "
                f"api_key_env={self.api_key_env!r} ({key}))")

    # --- capability ---------------------------------------------------------------------------------

    @property
    def capability(self) -> Capability:
        """What the server gives; the first access probes it (:meth:`probe`), so it may raise
        :class:`ServerUnavailable` (as may ``isinstance(teacher, Teacher)`` on Python 3.11, which reads it)."""
        if self._capability is None:
            self.probe()
        assert self._capability is not None
        return self._capability

    @property
    def token_map(self) -> TokenMap | None:
        if self._token_map is None and self.tokenizer is not None:
            self._token_map = TokenMap(self.tokenizer)
        return self._token_map

    def probe(self) -> Capability:
        """Find what the server gives, once: TOPK/TOKEN if echo + log-probs of a prompt work and
        are aligned (see the module docstring), else TEXT. Sets ``features`` to what was found."""
        with self._probe_lock:
            if self._capability is not None:
                return self._capability
            try:
                self._request("GET", "/models", None)  # reachable? (retried like any request)
            except ServerUnavailable:
                raise
            except ServerError:
                pass  # answers, without a model list: fine
            features: dict[str, Any] = {"logprobs": False, "prompt_ids": False, "echo": None, "echo_top": False}
            text = PROBE_TEXTS[0]
            gen = self._try({"prompt": text, "max_tokens": 1, "temperature": 0.0, "logprobs": 2})
            features["logprobs"] = bool(gen and _entries(gen)[0])
            cap = Capability.TEXT
            if self.tokenizer is not None and features["logprobs"]:
                ids = self._encode(text)
                # No retries: llama-cpp-python answers a list of ids with HTTP 500 (a validation error).
                ok = self._try({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 1, "echo": True},
                               retries=0)
                features["prompt_ids"] = bool(ok and len(_entries(ok)[0]) >= len(ids))
                bos = self.tokenizer.bos_token_id
                variants = [("exact", [])] + ([("after_bos", [bos])] if bos is not None else [])
                features["echo_checks"] = {}
                for mode, prefix in variants:
                    found = [self._echo_aligned(prefix + self._encode(t), features["prompt_ids"], mode)
                             for t in PROBE_TEXTS]
                    features["echo_checks"][mode] = found
                    conclusive = [f for f in found if f is not None]  # None: the probe text did not decide
                    if conclusive and all(conclusive):
                        features["echo"] = mode
                        features["echo_top"] = all(v == "top" for v in conclusive)
                        break
                if features["echo"]:
                    cap = Capability.TOPK if features["echo_top"] else Capability.TOKEN
            self.features = features
            self._capability = cap
            log.info("probed %s: %s %s", self.base_url, cap, features)
            return cap

    def _echo_aligned(self, ids: list[int], send_ids: bool, mode: str, n: int = 3) -> str | bool | None:
        """Whether echoed log-probs line up with generated ones on `ids` ("top" if they also carry top-k).

        Generates up to `n` greedy tokens with their log-probs, then echoes prompt + those tokens and
        compares: all within ``ALIGN_TOL`` is aligned. None when this prompt cannot decide (no
        log-probs, an unmapped token, or a re-tokenisation that does not reproduce the tokens).
        """
        prompt = ids if send_ids else self._decode(ids)
        gen = self._try({"prompt": prompt, "max_tokens": n, "temperature": 0.0, "logprobs": 2})
        if not gen:
            return False
        tokens, lps, _ = _entries(gen)
        new = [self.token_map.id(t) for t in tokens] if self.token_map else [None]
        if not tokens or None in new or None in lps:
            return None
        echo = self._try({"prompt": ids + new if send_ids else prompt + "".join(tokens), "max_tokens": 1,
                          "temperature": 0.0, "logprobs": 2, "echo": True})
        if not echo:
            return False
        e_tokens, e_lps, e_top = _entries(echo)
        n_prompt = len(self._echoed_positions(ids + new, mode))
        echoed = slice(n_prompt - len(tokens), n_prompt)
        if len(e_tokens) < n_prompt or n_prompt <= len(tokens) or e_tokens[echoed] != tokens:
            return None
        if any(lp is None or abs(lp - g) > ALIGN_TOL for lp, g in zip(e_lps[echoed], lps)):
            return False
        return "top" if all(e_top[echoed]) else True

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
                 seed: int | None = None) -> list[str]:
        """Responses to `prompts`, in order. Raises :class:`ServerError` (with ``completed``) on failure."""
        try:
            generations = self._generate_all(prompts, max_new_tokens, do_sample, temperature, top_p, system_prompt,
                                             seed, k=None)
        except ServerError as e:
            e.completed = {i: g.text for i, g in e.completed.items()}
            raise
        return [g.text for g in generations]

    def topk_of_generation(self, prompts: Sequence[str], *, max_new_tokens: int, k: int = 5,
                           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                           system_prompt: str | None = None, seed: int | None = None) -> list[ServedGeneration]:
        """Generations with the top-k log-probs of every generated token (ids through :class:`TokenMap`)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self._generate_all(prompts, max_new_tokens, do_sample, temperature, top_p, system_prompt, seed, k=k)

    def _generate_all(self, prompts, max_new_tokens, do_sample, temperature, top_p, system_prompt, seed,
                      k) -> list[ServedGeneration]:
        def one(prompt: str) -> ServedGeneration:
            params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0}
            if do_sample:
                params["top_p"] = top_p
            if seed is not None:
                params["seed"] = seed
            if self.chat:
                messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                    {"role": "user", "content": prompt}]
                body = {"messages": messages, **params, **({"logprobs": True, "top_logprobs": k} if k else {})}
                out = self._request("POST", "/chat/completions", {"model": self.model, **body})
                choice = out["choices"][0]
                text = choice["message"].get("content") or ""
                content = (choice.get("logprobs") or {}).get("content") or []
                tokens = [c["token"] for c in content]
                lps = [float(c["logprob"]) for c in content]
                top = [[(t["token"], float(t["logprob"])) for t in c.get("top_logprobs") or []] for c in content]
            else:
                rendered = self._render(prompt, system_prompt)
                body = {"prompt": rendered, **params, **({"logprobs": k} if k else {})}
                out = self._request("POST", "/completions", {"model": self.model, **body})
                choice = out["choices"][0]
                text = choice.get("text") or ""
                tokens, lp_or_none, tops = _entries(out)
                lps = [float(x) if x is not None else math.nan for x in lp_or_none]
                top = [sorted(t.items(), key=lambda p: -p[1]) if t else [] for t in tops]
            if k and len(tokens) == 0 and text:
                raise ServerError(f"{self.base_url}: the server returned no log-probs for a generation (k={k})")
            tmap = self.token_map if k else None
            return ServedGeneration(
                text=text, tokens=tokens, logprobs=lps, top=top, finish_reason=choice.get("finish_reason"),
                ids=[tmap.id(t) for t in tokens] if tmap else None,
                top_ids=[[tmap.id(t) for t, _ in row] for row in top] if tmap else None, _map=tmap)

        return self._map_concurrent(one, list(prompts))

    def _render(self, prompt: str, system_prompt: str | None) -> str:
        if self.tokenizer is None:
            return prompt
        from lmdistill.data.tokenize import render_prompt

        return render_prompt(self.tokenizer, prompt, system_prompt)

    # --- scoring ------------------------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise CapabilityError(f"a served teacher gives at most top-k log-probs, not full logits ({self.base_url})")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log-prob of each token given its prefix; the first token of a row and padding are 0,
        as ``LocalTeacher.score``. Positions the server does not score are NaN (module docstring).

        input_ids, attention_mask: (B, T); any padding side (the unmasked ids of a row are sent in order).
        """
        out = torch.zeros(input_ids.shape, dtype=torch.float32)  # (B, T)
        for b, row in enumerate(self._echo_rows(input_ids, attention_mask, k=1)):
            for t, lp in row.scores:
                out[b, t] = lp
        return out.to(input_ids.device)

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> TopK:
        """Top-k ids and log-probs (B, T, k) of the next token at every position, as ``LocalTeacher.topk``.

        Row t is the server's top-k for the token after t (the last token's row comes from the one
        generated token). Rows the server did not give (padding, unscored positions, the last one
        when the server stopped at EOS) and slots without a unique id are filled as
        :meth:`TokenMap.topk_row` describes.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        B, T = input_ids.shape
        rows = self._echo_rows(input_ids, attention_mask, k=k)
        tmap = self.token_map
        assert tmap is not None
        fill_ids, fill_lps = tmap.topk_row([], k)
        ids = torch.tensor(fill_ids, dtype=torch.long).repeat(B, T, 1)  # (B, T, k)
        lps = torch.tensor(fill_lps, dtype=torch.float32).repeat(B, T, 1)  # (B, T, k)
        for b, row in enumerate(rows):
            for t, top in row.tops:
                row_ids, row_lps = tmap.topk_row(top, k)
                ids[b, t], lps[b, t] = torch.tensor(row_ids), torch.tensor(row_lps)
        return TopK(ids=ids.to(input_ids.device), logprobs=lps.to(input_ids.device))

    def _echo_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> list[_EchoRow]:
        """One echo request per row (concurrently), mapped back to positions of the (B, T) batch."""
        if self.tokenizer is None:
            raise CapabilityError("scoring a sequence through a server needs the teacher's tokenizer: "
                                  "ServerTeacher(tokenizer=...)")
        if self.capability < Capability.TOKEN:
            raise CapabilityError(f"{self.base_url} does not score given sequences: probe() found no aligned "
                                  f"echo + logprobs (features: {self.features})")
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be (B, T)")
        rows = []
        for b in range(input_ids.shape[0]):
            where = attention_mask[b].nonzero().flatten().tolist()
            rows.append((where, input_ids[b, where].tolist()))
        return self._map_concurrent(lambda row: self._echo_one(row[0], row[1], k), rows)

    def _echo_one(self, where: list[int], ids: list[int], k: int) -> _EchoRow:
        """Score one sequence `ids` found at batch positions `where`."""
        row = _EchoRow()
        if len(ids) < 2:
            return row
        mode, bos = self.features["echo"], self.tokenizer.bos_token_id
        if mode == "after_bos" and ids[0] != bos:
            raise ScoreAlignmentError(
                f"{self.base_url} pairs echoed log-probs with the right tokens only for sequences that start with "
                f"the BOS token {self.tokenizer.bos_token!r} (id {bos}) (llama-cpp-python's behaviour, see "
                f"lmdistill.teachers.server); this one starts with id {ids[0]}")
        prompt = ids if self.features["prompt_ids"] else self._decode(ids)
        out = self._request("POST", "/completions", {"model": self.model, "prompt": prompt, "max_tokens": 1,
                                                     "temperature": 0.0, "logprobs": k, "echo": True})
        tokens, lps, tops = _entries(out)
        echoed = self._echoed_positions(ids, mode)  # the index j in `ids` of every echoed prompt entry
        n_prompt = len(echoed)
        if not n_prompt <= len(tokens) <= n_prompt + _completion_tokens(out):
            raise ScoreAlignmentError(
                f"{self.base_url} echoed {len(tokens)} tokens for a sequence of {len(ids)} tokens and "
                f"{_completion_tokens(out)} generated (expected {n_prompt} echoed): the server tokenised it differently")
        if not self.features["prompt_ids"]:
            self._check_tokens(ids, echoed, tokens[:n_prompt])
        for e, j in enumerate(echoed):
            if j == 0:
                continue
            row.scores.append((where[j], math.nan if lps[e] is None else float(lps[e])))
            if tops[e]:
                row.tops.append((where[j - 1], list(tops[e].items())))
        if mode == "after_bos":
            row.scores += [(where[j], math.nan) for j in range(1, len(ids)) if ids[j] == bos]
        if n_prompt < len(tokens) and tops[n_prompt]:
            row.tops.append((where[-1], list(tops[n_prompt].items())))
        return row

    def _echoed_positions(self, ids: list[int], mode: str) -> list[int]:
        """Indices into `ids` of the prompt entries the server echoes (all, or all but BOS-id tokens)."""
        if mode == "exact":
            return list(range(len(ids)))
        bos = self.tokenizer.bos_token_id
        return [j for j in range(len(ids)) if ids[j] != bos]

    def _check_tokens(self, ids: list[int], mine: list[int], tokens: list[str]) -> None:
        tmap = self.token_map
        assert tmap is not None
        for j, token in zip(mine, tokens):
            ours = tmap.texts[ids[j]]
            if ids[j] in tmap.special or not token or "\ufffd" in ours or token == ours:
                continue
            if token.replace(" ", "▁") == self.tokenizer.convert_ids_to_tokens(ids[j]):
                continue
            raise ScoreAlignmentError(
                f"{self.base_url} tokenised the decoded sequence differently: at position {j} it has {token!r}, "
                f"the teacher tokenizer {ours!r} (id {ids[j]}); scores would be misaligned")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # --- transport ----------------------------------------------------------------------------------

    def _map_concurrent(self, fn: Callable[[Any], R], items: list) -> list[R]:
        """fn over items on `concurrency` threads, in order; on failure raise with the finished results."""
        results: dict[int, R] = {}
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            error: Exception | None = None
            for future, i in futures.items():
                try:
                    results[i] = future.result()
                except Exception as e:  # noqa: BLE001 - re-raised below, with the finished results
                    if error is None:
                        error = e
                        pool.shutdown(wait=False, cancel_futures=True)
        if error is not None:
            if isinstance(error, ServerError):
                raise type(error)(f"{error} ({len(results)} of {len(items)} results completed; they are in "
                                  ".completed)", completed=results) from error
            raise error
        return [results[i] for i in range(len(items))]

    def _try(self, body: dict, *, retries: int | None = None) -> dict | None:
        """POST /completions for probing: None when the server refuses it (4xx, or 5xx with `retries`=0);
        :class:`ServerUnavailable` (it could not be asked) propagates when retries were allowed."""
        try:
            return self._request("POST", "/completions", {"model": self.model, **body}, retries=retries)
        except ServerUnavailable:
            if retries == 0:
                return None
            raise
        except ServerError:
            return None

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _request(self, method: str, path: str, body: dict | None, *, retries: int | None = None) -> dict:
        """One JSON request with timeout and retries; the parsed response."""
        url = self.base_url + path
        retries = self.max_retries if retries is None else retries
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        started = time.monotonic()
        last: _Retryable | None = None
        for attempt in range(retries + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                if last is not None and last.retry_after is not None:
                    delay = min(max(last.retry_after, 0.0), self.max_backoff)
                log.warning("%s %s failed (%s); retry %d/%d in %.1fs", method, url, last, attempt, retries, delay)
                time.sleep(delay)
            try:
                return self._send(urllib.request.Request(url, data=data, headers=headers, method=method))
            except _Retryable as e:
                last = _Retryable(self._scrub(str(e)), timeout=e.timeout, retry_after=e.retry_after)
            except _HTTPStatus as e:
                hint = f" (is ${self.api_key_env} right?)" if e.status in (401, 403) else ""
                raise ServerError(f"{method} {url}: {self._scrub(str(e))}{hint}") from None
        assert last is not None
        kind = ServerTimeout if last.timeout else ServerUnavailable
        raise kind(f"{method} {url}: gave up after {retries + 1} attempts in {time.monotonic() - started:.1f}s; "
                   f"last error: {last}")

    def _send(self, request: urllib.request.Request) -> dict:
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            body = e.read(2000).decode("utf-8", "replace") if e.fp is not None else ""
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {body[:300]}", retry_after=_retry_after(e.headers)) from None
            raise _HTTPStatus(e.code, body[:1000]) from None
        except urllib.error.URLError as e:
            timeout = isinstance(e.reason, TimeoutError)
            raise _Retryable(f"{type(e.reason).__name__}: {e.reason}", timeout=timeout) from None
        except TimeoutError as e:
            raise _Retryable(f"timed out after {self.timeout}s ({e})", timeout=True) from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retryable(f"invalid JSON in response ({len(raw)} bytes)") from None


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _entries(response: dict) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
    """(tokens, token_logprobs, top_logprobs) of a legacy /completions response's first choice."""
    lp = (response.get("choices") or [{}])[0].get("logprobs") or {}
    tokens = list(lp.get("tokens") or [])
    return tokens, list(lp.get("token_logprobs") or [None] * len(tokens)), list(lp.get("top_logprobs") or [None] * len(tokens))


def _completion_tokens(response: dict) -> int:
    usage = response.get("usage") or {}
    return int(usage.get("completion_tokens", 1))
