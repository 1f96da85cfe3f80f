"""A teacher behind an OpenAI-compatible HTTP server: llama.cpp, vLLM, or a provider.

Endpoints used (``base_url`` ends with ``/v1``): ``GET /models``, ``POST /completions``,
``POST /chat/completions``. One module per job:

- :mod:`.transport`: httpx with a tenacity retry policy (timeouts, exponential backoff,
  ``Retry-After``, which errors are retried), the thread pool of ``concurrency`` workers, the API
  key (never in a repr, an error message or a log line); :class:`ServerError` and its kinds.
- :mod:`.probe`: what the server gives and in which dialect, found once on first use of
  ``capability``: ``text`` always; ``topk`` when vLLM's ``prompt_logprobs`` of a prompt of ids work
  and are aligned; else ``token`` / ``topk`` when echo + log-probs do.
- :mod:`.scoring`: :meth:`~ServerTeacher.score` and :meth:`~ServerTeacher.topk` of a given sequence
  (needs the teacher's own ``tokenizer``): what the dialects share, and the echo dialect (llama.cpp,
  the OpenAI API) with the llama-cpp-python quirks it handles; :class:`ScoreAlignmentError`.
- :mod:`.prompt_logprobs`: vLLM's dialect: ``prompt_logprobs`` (top-k and the token's own log-prob)
  on a prompt of token ids, ``logprobs`` of the generated token, ids returned as ids
  (``return_tokens_as_token_ids``); :class:`ServerResponseError` on an answer of another shape.
- :mod:`.tokens`: :class:`TokenMap`, the server's tokens (strings, or vLLM's ``token_id:N``) → the tokenizer's ids.
- :mod:`.generation`: :meth:`~ServerTeacher.generate` through ``/completions`` or ``/chat/completions``.
- :mod:`.teacher`: :class:`ServerTeacher`, the :class:`~lmdistill.teachers.base.Teacher` that joins them.
"""

from lmdistill.teachers.server.scoring import ScoreAlignmentError
from lmdistill.teachers.server.teacher import ServerTeacher
from lmdistill.teachers.server.tokens import TokenMap
from lmdistill.teachers.server.transport import (
    ServerAuthError,
    ServerError,
    ServerResponseError,
    ServerTimeout,
    ServerUnavailable,
)

__all__ = ["ScoreAlignmentError", "ServerAuthError", "ServerError", "ServerResponseError", "ServerTeacher",
           "ServerTimeout", "ServerUnavailable", "TokenMap"]
