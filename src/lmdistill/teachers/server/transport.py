"""JSON over HTTP to an OpenAI-compatible server: timeouts, retries, concurrency, the API key.

The connection pool, timeouts and proxies are httpx's (:class:`httpx.Client`); the retry policy
is tenacity's: connection errors, timeouts, HTTP 429, 5xx and an unreadable body are retried with
exponential backoff (``backoff · 2^attempt`` seconds, or the server's ``Retry-After``, at most
``max_backoff``), up to ``max_retries`` times; other 4xx fail at once, 401 and 403 as
:class:`ServerAuthError`. The API key, read from the
environment variable named by ``api_key_env``, is sent as ``Authorization: Bearer`` and scrubbed
from every message and log line this module writes (a hostile server may echo it back).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import tenacity

from lmdistill.io import UserError

log = logging.getLogger(__name__)

R = TypeVar("R")

LOOPBACK = ("localhost", "127.0.0.1", "::1")


class ServerError(UserError, RuntimeError):
    """A request failed. ``completed`` holds the results finished before the failure, by index."""

    def __init__(self, message: str, *, completed: dict[int, Any] | None = None) -> None:
        super().__init__(message)
        self.completed: dict[int, Any] = completed or {}


class ServerUnavailable(ServerError):
    """Retries exhausted on connection errors, timeouts, 429 or 5xx."""


class ServerTimeout(ServerUnavailable):
    """Retries exhausted and the last attempt timed out."""


class ServerAuthError(ServerError):
    """The server refused the credentials (HTTP 401 or 403): no key, or not one it accepts."""


class ServerResponseError(ServerError):
    """The server answered 200 with a body that does not have the shape its dialect promises."""


class _Retryable(Exception):
    """One failed attempt that the policy retries (its message already scrubbed of the key)."""

    def __init__(self, reason: str, *, timeout: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.timeout = timeout
        self.retry_after = retry_after


class Transport:
    """JSON requests to ``base_url`` (e.g. ``http://127.0.0.1:8080/v1``) with the policy of the module docstring.

    Args:
        timeout: seconds per attempt (connect, and each read).
        max_retries: retries after the first attempt.
        backoff: first retry delay in seconds, doubled every retry (capped at ``max_backoff``).
        concurrency: requests in flight at once in :meth:`map`.
    """

    def __init__(self, base_url: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0, concurrency: int = 4) -> None:
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("ServerTeacher: need concurrency >= 1, max_retries >= 0, timeout > 0, backoff >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.concurrency = concurrency
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # Proxies from the environment apply to remote servers, never to loopback.
        remote = httpx.URL(self.base_url).host not in LOOPBACK
        self._client = httpx.Client(timeout=timeout, headers=headers, trust_env=remote,
                                    limits=httpx.Limits(max_connections=max(concurrency, 10)))
        self._exponential = tenacity.wait_exponential(multiplier=backoff, max=max_backoff, min=0)

    @property
    def has_key(self) -> bool:
        return self._api_key is not None

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def scrub(self, text: str) -> str:
        """`text` with the API key replaced by ``***``."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def request(self, method: str, path: str, body: dict | None = None, *, retries: int | None = None) -> dict:
        """One JSON request (`path` below ``base_url``) under the retry policy; the parsed response.

        Raises :class:`ServerError` (HTTP 4xx other than 429; :class:`ServerAuthError` for 401 and 403),
        :class:`ServerUnavailable` or :class:`ServerTimeout` (retries exhausted).
        """
        url = self.base_url + path
        retries = self.max_retries if retries is None else retries
        started = time.monotonic()

        def before_sleep(state: tenacity.RetryCallState) -> None:
            log.warning("%s %s failed (%s); retry %d/%d in %.1fs", method, url, state.outcome.exception(),
                        state.attempt_number, retries, state.next_action.sleep)

        policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(retries + 1), wait=self._wait,
                                   retry=tenacity.retry_if_exception_type(_Retryable), before_sleep=before_sleep,
                                   reraise=True)
        try:
            return policy(self._send, method, url, body)
        except _Retryable as last:
            kind = ServerTimeout if last.timeout else ServerUnavailable
            raise kind(f"{method} {url}: gave up after {retries + 1} attempt{'s' if retries else ''} in {time.monotonic() - started:.1f}s; "
                       f"last error: {last} (is the server running at teacher.base_url={self.base_url}?)") from None

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Seconds before the next attempt: the server's Retry-After if it sent one, else exponential."""
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, _Retryable) and error.retry_after is not None:
            return min(max(error.retry_after, 0.0), self.max_backoff)
        return self._exponential(state)

    def _send(self, method: str, url: str, body: dict | None) -> dict:
        """One attempt: the parsed JSON reply; :class:`_Retryable` or :class:`ServerError` on failure."""
        try:
            response = self._client.request(method, url, json=body)
        except httpx.UnsupportedProtocol as e:  # a base_url without http(s)://: no retry can help
            raise ServerError(f"{method} {url}: {e}") from None
        except httpx.TimeoutException as e:
            raise _Retryable(f"timed out after {self.timeout}s ({type(e).__name__})", timeout=True) from None
        except httpx.TransportError as e:
            raise _Retryable(self.scrub(f"{type(e).__name__}: {e}")) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(self.scrub(f"HTTP {status}: {response.text[:300]}"),
                             retry_after=_retry_after(response.headers)) from None
        if status in (401, 403):
            key = "is not accepted" if self.has_key else "is not set"
            raise ServerAuthError(f"{method} {url}: authentication failed, " + self.scrub(f"HTTP {status}: "
                                  f"{response.text[:300]}") + f"; the API key in ${self.api_key_env} {key} (set the "
                                  "variable, or name another with teacher.api_key_env)")
        if status >= 400:
            raise ServerError(f"{method} {url}: " + self.scrub(f"HTTP {status}: {response.text[:1000]}"))
        try:
            return response.json()
        except ValueError:
            raise _Retryable(f"invalid JSON in response ({len(response.content)} bytes)") from None

    def map(self, fn: Callable[[Any], R], items: list) -> list[R]:
        """fn over items on `concurrency` threads, in order; on a failure, raise it with the finished
        results in ``completed`` (a :class:`ServerError`; other errors as they are)."""
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


def _retry_after(headers: httpx.Headers) -> float | None:
    """Retry-After in seconds (the delay form; an HTTP date is ignored)."""
    try:
        return float(headers["Retry-After"]) if "Retry-After" in headers else None
    except ValueError:
        return None
