"""A teacher behind an OpenAI-compatible HTTP server: llama.cpp, vLLM, or a provider.

Endpoints used (``base_url`` ends with ``/v1``): ``GET /models``, ``POST /completions``,
``POST /chat/completions``. One module per job:

- :mod:`.transport`: httpx with a tenacity retry policy (timeouts, exponential backoff,
  ``Retry-After``, which errors are retried), the thread pool of ``concurrency`` workers, the API
  key (never in a repr, an error message or a log line); :class:`ServerError` and its kinds.
- :mod:`.probe`: what the server gives, found once on first use of ``capability``: ``text``
  always; ``token`` / ``topk`` when echo + log-probs of a prompt work and are aligned.
- :mod:`.scoring`: :meth:`~ServerTeacher.score` and :meth:`~ServerTeacher.topk` of a given sequence
  through ``/completions`` echo (needs the teacher's own ``tokenizer``), with the llama-cpp-python
  quirks it handles; :class:`ScoreAlignmentError`.
- :mod:`.tokens`: :class:`TokenMap`, the server's token strings → the tokenizer's ids.
- :mod:`.generation`: :meth:`~ServerTeacher.generate` through ``/completions`` or ``/chat/completions``.
- :mod:`.teacher`: :class:`ServerTeacher`, the :class:`~lmdistill.teachers.base.Teacher` that joins them.
"""

from lmdistill.teachers.server.scoring import ScoreAlignmentError
from lmdistill.teachers.server.teacher import ServerTeacher
from lmdistill.teachers.server.tokens import TokenMap
from lmdistill.teachers.server.transport import ServerAuthError, ServerError, ServerTimeout, ServerUnavailable

__all__ = ["ScoreAlignmentError", "ServerAuthError", "ServerError", "ServerTeacher", "ServerTimeout", "ServerUnavailable",
           "TokenMap"]
