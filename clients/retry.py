"""Retries with exponential backoff and jitter, bounded in attempts and by the call's deadline.

UNAVAILABLE is retried (nothing listening, a connection dropped, HTTP 502/503, a model still
loading, a server shutting down): those calls did not run, and a prediction is a pure function of
its input, so repeating it is safe. CANCELLED is retried for idempotent calls (every call of this
API is) when the client did not cancel the call itself: a server or proxy that goes away can cancel
a call it had already received, which may or may not have run. Every other code (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) is raised at once; a full queue is the caller's signal
to slow down, not the client's to push harder. The wait after the n-th failed attempt is drawn
uniformly from ``[(1 - jitter) * b, b]`` with ``b = min(max_backoff, initial_backoff * multiplier**(n-1))``,
and a retry that could not start before the deadline is not made: the last error is raised, with
the number of attempts in ``ClientError.attempts``.

`Attempts` is the bookkeeping of one call and has no I/O, so the sync and the async client share
it and differ only in how they sleep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from clients.errors import ClientError


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts``: calls in all (None: until the deadline); ``on_retry(attempt, error, wait_s)``
    is called before each wait (logging, tests)."""

    max_attempts: int | None = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retry_codes: frozenset[str] = frozenset({"UNAVAILABLE"})
    idempotent_retry_codes: frozenset[str] = frozenset({"CANCELLED"})  # retried for idempotent calls only
    on_retry: Callable[[int, ClientError, float], None] | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (1: no retries), got {self.max_attempts}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff(self, attempt: int) -> float:
        """The wait after the ``attempt``-th failed attempt (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return ceiling * random.uniform(1 - self.jitter, 1)


NO_RETRY = RetryPolicy(max_attempts=1)


class Attempts:
    """One call's attempts: ``remaining()`` before each, ``wait_after(error)`` after each failure."""

    def __init__(self, policy: RetryPolicy, timeout: float | None, *, idempotent: bool = False) -> None:
        self.policy = policy
        self.idempotent = idempotent
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.count = 0

    def remaining(self) -> float | None:
        """Seconds left for the next attempt (None: no deadline); counts the attempt."""
        self.count += 1
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def wait_after(self, error: ClientError) -> float:
        """The wait before the next attempt, or raise ``error`` when the call must not be retried."""
        error.attempts = self.count
        limit = self.policy.max_attempts
        if not self.retryable(error) or (limit is not None and self.count >= limit):
            raise self._final(error)
        wait = self.policy.backoff(self.count)
        if self.deadline is not None and time.monotonic() + wait >= self.deadline:
            raise self._final(error)
        if self.policy.on_retry is not None:
            self.policy.on_retry(self.count, error, wait)
        return wait

    def retryable(self, error: ClientError) -> bool:
        if error.code in self.policy.retry_codes:
            return True
        return self.idempotent and not error.local and error.code in self.policy.idempotent_retry_codes

    def _final(self, error: ClientError) -> ClientError:
        if self.count > 1:
            error.args = (f"{error} (gave up after {self.count} attempts)",)
        return error
