"""Generations from a server: ``/chat/completions`` (the server's chat template) or ``/completions``
(the prompt rendered here with the teacher tokenizer's template, or sent as it is without one)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lmdistill.data.tokenize import render_prompt
from lmdistill.teachers.server.transport import Transport


def generate_one(transport: Transport, model: str, prompt: str, *, max_new_tokens: int, do_sample: bool,
                 temperature: float, top_p: float, system_prompt: str | None, seed: int | None, chat: bool,
                 tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The response to one prompt (greedy unless `do_sample`)."""
    params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0}
    if do_sample:
        params["top_p"] = top_p
    if seed is not None:
        params["seed"] = seed
    if chat:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        out = transport.request("POST", "/chat/completions", {"model": model, "messages": messages, **params})
        return out["choices"][0]["message"].get("content") or ""
    rendered = render_prompt(tokenizer, prompt, system_prompt) if tokenizer is not None else prompt
    out = transport.request("POST", "/completions", {"model": model, "prompt": rendered, **params})
    return out["choices"][0].get("text") or ""
