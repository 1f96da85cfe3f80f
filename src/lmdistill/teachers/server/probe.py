"""What a server gives, found once by asking it: text only, or token / top-k scores of given sequences.

TOPK/TOKEN needs echo + log-probs of a prompt that are *aligned*: the probe asks for the greedy next
tokens ``g`` of a prompt, then scores ``prompt + g`` and requires the echoed log-prob of each ``g`` to
equal the one generation reported (within :data:`ALIGN_TOL`). llama-cpp-python 0.3.36 (its server
accepts only text prompts) passes only when the sequence starts with the BOS token: it drops a
leading BOS and pairs every other token with the right prediction, but with no leading BOS it pairs
token t with the prediction *for* t + 1 (off by one); see :mod:`.scoring` for what follows.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmdistill.teachers.base import Capability
from lmdistill.teachers.server.scoring import Echo, completion_entries, echoed_positions
from lmdistill.teachers.server.tokens import TokenMap, decode, encode
from lmdistill.teachers.server.transport import ServerAuthError, ServerError, ServerUnavailable, Transport

log = logging.getLogger(__name__)

ALIGN_TOL = 0.1
"""Largest |echoed − generated| log-prob (nats) of the same token accepted as aligned. llama.cpp
evaluates a prompt in batches and a generated token alone, and its quantised kernels differ between
the two by ~0.02 nats on SmolLM2 Q4_1; a misaligned echo is off by nats."""

PROBE_TEXTS = ("The capital of France is", "1, 2, 3, 4, 5, 6,")


def probe(transport: Transport, model: str, tokenizer: PreTrainedTokenizerBase | None,
          token_map: TokenMap | None) -> tuple[Capability, dict[str, Any], Echo | None]:
    """(capability, features found, how the server echoes or None) of the server behind `transport`.

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
    features: dict[str, Any] = {"logprobs": False, "prompt_ids": False, "echo": None, "echo_top": False}
    text = PROBE_TEXTS[0]
    gen = _try(transport, model, {"prompt": text, "max_tokens": 1, "temperature": 0.0, "logprobs": 2})
    features["logprobs"] = bool(gen and completion_entries(gen)[0])
    cap, echo = Capability.TEXT, None
    if tokenizer is not None and token_map is not None and features["logprobs"]:
        ids = encode(tokenizer, text)
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
                features["echo"] = mode
                features["echo_top"] = all(v == "top" for v in conclusive)
                break
        if features["echo"]:
            cap = Capability.TOPK if features["echo_top"] else Capability.TOKEN
            echo = Echo(mode=features["echo"], prompt_ids=features["prompt_ids"])
    log.info("probed %s: %s %s", transport.base_url, cap, features)
    return cap, features, echo


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
