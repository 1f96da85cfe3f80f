"""What a server gives, found once by asking it: text only, or token / top-k scores of given sequences,
and in which dialect.

TOPK/TOKEN needs log-probs of a prompt that are *aligned*: the probe asks for the greedy next tokens
``g`` of a prompt, then scores ``prompt + g`` and requires the prompt log-prob of each ``g`` to equal
the one generation reported (within :data:`ALIGN_TOL`). Two dialects are tried, in this order:
vLLM's ``prompt_logprobs`` on a prompt of token ids (:mod:`.prompt_logprobs`; ids in and out, top-k
always), then echo + log-probs (:mod:`.scoring`; llama.cpp, the OpenAI API). The first whose every
conclusive check is aligned is the server's dialect (``features["dialect"]``: ``"vllm"``,
``"echo"``, or None).

In the echo dialect, llama-cpp-python 0.3.36 (its server accepts only text prompts) passes only when
the sequence starts with the BOS token: it drops a leading BOS and pairs every other token with the
right prediction, but with no leading BOS it pairs token t with the prediction *for* t + 1 (off by
one); see :mod:`.scoring` for what follows.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmdistill.teachers.base import Capability
from lmdistill.teachers.server.prompt_logprobs import PromptLogprobs, generated, prompt_entries, request
from lmdistill.teachers.server.scoring import Echo, completion_entries, echoed_positions
from lmdistill.teachers.server.tokens import TOKEN_ID, TokenMap, decode, encode
from lmdistill.teachers.server.transport import (
    ServerAuthError,
    ServerError,
    ServerResponseError,
    ServerUnavailable,
    Transport,
)

log = logging.getLogger(__name__)

ALIGN_TOL = 0.1
"""Largest |echoed − generated| log-prob (nats) of the same token accepted as aligned. llama.cpp
evaluates a prompt in batches and a generated token alone, and its quantised kernels differ between
the two by ~0.02 nats on SmolLM2 Q4_1; a misaligned echo is off by nats."""

PROBE_TEXTS = ("The capital of France is", "1, 2, 3, 4, 5, 6,")


def probe(transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase | None,
          token_map: TokenMap | None) -> tuple[Capability, dict[str, Any], PromptLogprobs | Echo | None]:
    """(capability, features found, the dialect it scores prompts in or None) of the server behind `transport`.

    Without a tokenizer a server gives TEXT at most. Raises :class:`ServerUnavailable` when the
    server cannot be reached (after the retries), :class:`ServerAuthError` when it refuses the API key
    (a refusal is not a missing capability).
    """
    try:
        transport.request("GET", "/models")  # reachable? (retried like any request)
    except (ServerUnavailable, ServerAuthError):
        raise
    except ServerError:
        pass  # answers, without a model list: fine
    features: dict[str, Any] = {"logprobs": False, "dialect": None, "prompt_logprobs": False, "token_ids": False,
                                "prompt_ids": False, "echo": None, "echo_top": False}
    gen = _try(transport, model, {"prompt": PROBE_TEXTS[0], "max_tokens": 1, "temperature": 0.0, "logprobs": 2})
    features["logprobs"] = bool(gen and completion_entries(gen)[0])
    cap, dialect = Capability.TEXT, None
    if tokenizer is not None and token_map is not None and features["logprobs"]:
        dialect = (_probe_prompt_logprobs(transport, model, tokenizer, token_map, features)
                   or _probe_echo(transport, model, tokenizer, token_map, features))
        if isinstance(dialect, PromptLogprobs):
            cap = Capability.TOPK
        elif isinstance(dialect, Echo):
            cap = Capability.TOPK if features["echo_top"] else Capability.TOKEN
    log.info("probed %s: %s %s", transport.base_url, cap, features)
    return cap, features, dialect


def _probe_echo(transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase, token_map: TokenMap,
                features: dict[str, Any]) -> Echo | None:
    """The echo dialect, if the server echoes aligned; sets ``prompt_ids``, ``echo``, ``echo_top`` and
    ``echo_checks`` in `features`."""
    ids = encode(tokenizer, PROBE_TEXTS[0])
    # No retries: llama-cpp-python answers a list of ids with HTTP 500 (a validation error).
    ok = _try(transport, model, {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 1, "echo": True},
              retries=0)
    features["prompt_ids"] = bool(ok and len(completion_entries(ok)[0]) >= len(ids))
    bos = tokenizer.bos_token_id
    variants = [("exact", [])] + ([("after_bos", [bos])] if bos is not None else [])
    features["echo_checks"] = {}
    for mode, prefix in variants:
        found = [_echo_aligned(transport, model, tokenizer, token_map, prefix + encode(tokenizer, t),
                               features["prompt_ids"], mode) for t in PROBE_TEXTS]
        features["echo_checks"][mode] = found
        conclusive = [f for f in found if f is not None]  # None: the probe text did not decide
        if conclusive and all(conclusive):
            features.update(dialect="echo", echo=mode, echo_top=all(v == "top" for v in conclusive))
            return Echo(mode=mode, prompt_ids=features["prompt_ids"])
    return None


def _probe_prompt_logprobs(transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase, token_map: TokenMap,
                           features: dict[str, Any]) -> PromptLogprobs | None:
    """vLLM's dialect, if the server speaks it aligned; sets ``prompt_logprobs``, ``token_ids`` and
    ``prompt_logprobs_checks`` in `features`."""
    ids = encode(tokenizer, PROBE_TEXTS[0])
    # No retries: llama-cpp-python answers a list of ids with HTTP 500 (a validation error).
    first = _try(transport, model, request(ids, k=1), retries=0)
    if not first:
        return None
    try:
        prompt_entries(first, len(ids), len(tokenizer), transport.base_url)
        tokens = generated(first, token_map, transport.base_url)[0]
    except ServerResponseError:
        return None  # no prompt_logprobs of this prompt: not vLLM's dialect (the echo probe tells the rest)
    raw_tokens = first["choices"][0]["logprobs"]["tokens"] if tokens else []
    features["prompt_logprobs"] = True
    features["token_ids"] = bool(raw_tokens) and all(TOKEN_ID.fullmatch(str(t)) for t in raw_tokens)
    found = [_prompt_logprobs_aligned(transport, model, tokenizer, token_map, encode(tokenizer, t))
             for t in PROBE_TEXTS]
    features["prompt_logprobs_checks"] = found
    conclusive = [f for f in found if f is not None]
    if not (conclusive and all(conclusive)):
        return None
    features.update(dialect="vllm", prompt_ids=True)
    return PromptLogprobs(token_ids=features["token_ids"])


def _prompt_logprobs_aligned(transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase,
                             token_map: TokenMap, ids: list[int], n: int = 3) -> bool | None:
    """Whether ``prompt_logprobs`` of ``ids + g`` give the greedy tokens g the log-probs generation gave
    them (all within ``ALIGN_TOL``). None when this prompt cannot decide (no log-probs, an unread token)."""
    gen = _try(transport, model, request(ids, k=1, max_tokens=n))
    if not gen:
        return False
    try:
        new, lps, _ = generated(gen, token_map, transport.base_url)
    except ServerResponseError:
        return False
    if not new or None in new or None in lps:
        return None
    scored = _try(transport, model, request(ids + new, k=1))
    if not scored:
        return False
    try:
        entries = prompt_entries(scored, len(ids) + len(new), len(tokenizer), transport.base_url)
    except ServerResponseError:
        return False
    echoed = [entries[len(ids) + i].get(g) for i, g in enumerate(new)]
    return all(e is not None and abs(e[0] - g) <= ALIGN_TOL for e, g in zip(echoed, lps))


def _echo_aligned(transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase, token_map: TokenMap,
                  ids: list[int], send_ids: bool, mode: str, n: int = 3) -> str | bool | None:
    """Whether echoed log-probs line up with generated ones on `ids` ("top" if they also carry top-k).

    Generates up to `n` greedy tokens with their log-probs, then echoes prompt + those tokens and
    compares: all within ``ALIGN_TOL`` is aligned. None when this prompt cannot decide (no
    log-probs, an unmapped token, or a re-tokenisation that does not reproduce the tokens).
    """
    prompt = ids if send_ids else decode(tokenizer, ids)
    gen = _try(transport, model, {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "logprobs": 2})
    if not gen:
        return False
    tokens, lps, _ = completion_entries(gen)
    new = [token_map.id(t) for t in tokens]
    if not tokens or None in new or None in lps:
        return None
    echo = _try(transport, model, {"prompt": ids + new if send_ids else prompt + "".join(tokens), "max_tokens": 1,
                                   "temperature": 0.0, "logprobs": 2, "echo": True})
    if not echo:
        return False
    e_tokens, e_lps, e_top = completion_entries(echo)
    n_prompt = len(echoed_positions(ids + new, mode, tokenizer.bos_token_id))
    echoed = slice(n_prompt - len(tokens), n_prompt)
    if len(e_tokens) < n_prompt or n_prompt <= len(tokens) or e_tokens[echoed] != tokens:
        return None
    if any(lp is None or abs(lp - g) > ALIGN_TOL for lp, g in zip(e_lps[echoed], lps)):
        return False
    return "top" if all(e_top[echoed]) else True


def _try(transport: Transport, model: str, body: dict, *, retries: int | None = None) -> dict | None:
    """POST /completions for probing: None when the server refuses it (4xx, or 5xx with `retries`=0);
    :class:`ServerUnavailable` (it could not be asked) propagates when retries were allowed, and
    :class:`ServerAuthError` always."""
    try:
        return transport.request("POST", "/completions", {"model": model, **body}, retries=retries)
    except ServerAuthError:
        raise
    except ServerUnavailable:
        if retries == 0:
            return None
        raise
    except ServerError:
        return None
