""":class:`ServerTeacher`: the teacher protocol over an OpenAI-compatible server (see the package docstring)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lmdistill.losses import TopK
from lmdistill.teachers.base import Capability, CapabilityError, Teacher
from lmdistill.teachers.server.generation import generate_one
from lmdistill.teachers.server.probe import probe
from lmdistill.teachers.server.prompt_logprobs import PromptLogprobs, PromptLogprobsScorer
from lmdistill.teachers.server.scoring import EchoScorer, Scorer
from lmdistill.teachers.server.tokens import TokenMap
from lmdistill.teachers.server.transport import Transport


class ServerTeacher(Teacher):
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

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 tokenizer: PreTrainedTokenizerBase | None = None, timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 0.5, concurrency: int = 4, chat: bool = False, max_backoff: float = 30.0) -> None:
        self.transport = Transport(base_url, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                                   backoff=backoff, max_backoff=max_backoff, concurrency=concurrency)
        self.base_url = self.transport.base_url
        self.model = model
        self.name = f"server:{model}"
        self.api_key_env = api_key_env
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer) if tokenizer is not None else None
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.concurrency = concurrency
        self.chat = chat
        self.features: dict[str, Any] | None = None
        """What :meth:`probe` found (None before)."""
        self._capability: Capability | None = None
        self._scorer: Scorer | None = None
        self._probe_lock = threading.Lock()
        self._token_map: TokenMap | None = None

    def __repr__(self) -> str:
        key = "set" if self.transport.has_key else "unset"
        cap = str(self._capability) if self._capability is not None else "not probed"
        return (f"ServerTeacher(base_url={self.base_url!r}, model={self.model!r}, capability={cap}, "
                f"api_key_env={self.api_key_env!r} ({key}))")

    def close(self) -> None:
        """Close the pooled HTTP connections (the teacher can still be used; it reconnects)."""
        self.transport.close()

    @property
    def capability(self) -> Capability:
        """What the server gives; the first access probes it (:meth:`probe`), so it may raise
        :class:`ServerUnavailable`."""
        if self._capability is None:
            self.probe()
        assert self._capability is not None
        return self._capability

    @property
    def token_map(self) -> TokenMap | None:
        """Token strings → the tokenizer's ids (None without a tokenizer); built on first use."""
        if self._token_map is None and self.tokenizer is not None:
            self._token_map = TokenMap(self.tokenizer)
        return self._token_map

    def probe(self) -> Capability:
        """Find what the server gives, once (:func:`lmdistill.teachers.server.probe.probe`); sets ``features``."""
        with self._probe_lock:
            if self._capability is None:
                cap, self.features, dialect = probe(self.transport, self.model, self.tokenizer, self.token_map)
                if dialect is not None:
                    assert self.tokenizer is not None and self.token_map is not None
                    args = (self.transport, self.model, self.tokenizer, self.token_map)
                    self._scorer = (PromptLogprobsScorer(*args, dialect) if isinstance(dialect, PromptLogprobs)
                                    else EchoScorer(*args, dialect))
                self._capability = cap
            return self._capability

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
                 seed: int | None = None) -> list[str]:
        """Responses to `prompts`, in order. Raises :class:`ServerError` (with ``completed``) on failure."""
        def one(prompt: str) -> str:
            return generate_one(self.transport, self.model, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, system_prompt=system_prompt, seed=seed,
                                chat=self.chat, tokenizer=self.tokenizer)

        return self.transport.map(one, list(prompts))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice | None = None) -> torch.Tensor:
        raise CapabilityError(f"a served teacher gives at most top-k log-probs, not full logits ({self.base_url})")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log-prob of each token given its prefix; the first token of a row and padding are 0,
        as ``LocalTeacher.score``. Positions the server does not score are NaN (package docstring).

        input_ids, attention_mask: (B, T); any padding side (the unmasked ids of a row are sent in order).
        """
        return self._scoring().score(input_ids, attention_mask)

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, window: slice | None = None) -> TopK:
        """Top-k ids and log-probs (B, W, k) of the next token at the positions `window` (None: all), as
        ``LocalTeacher.topk``.

        Row t is the server's top-k for the token after t (the last token's row comes from the one
        generated token). Rows the server did not give (padding, unscored positions, the last one
        when the server stopped at EOS) and slots without a unique id are filled as
        :meth:`TokenMap.topk_ids_row` describes. vLLM refuses k above its ``--max-logprobs`` (20 by default).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        top = self._scoring().topk(input_ids, attention_mask, k)
        return top if window is None else top.select((slice(None), window))

    def _scoring(self) -> Scorer:
        if self.tokenizer is None:
            raise CapabilityError("scoring a sequence through a server needs the teacher's tokenizer: "
                                  "ServerTeacher(tokenizer=...)")
        if self.capability < Capability.TOKEN:
            raise CapabilityError(f"{self.base_url} does not score given sequences: probe() found no aligned "
                                  f"prompt_logprobs (vLLM) or echo + logprobs (features: {self.features})")
        assert self._scorer is not None
        return self._scorer
