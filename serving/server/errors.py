"""The gateway's one exception vocabulary and its one mapping to gRPC and HTTP status codes.

Every failure a caller can cause or see is a `GatewayError` subclass carrying a `Code`; the gRPC
servicer and the HTTP app both translate through `Code`, so the two protocols always agree. `Code`
is built from the wire's status table (`parsimony.wire.STATUSES`, which the clients read too): its
members are the gateway's status names (error bodies carry them), ``grpc_name`` the gRPC status
name that gRPC answers with and the metrics count by (an HTTP-only refusal counts as its gRPC
equivalent), ``http`` the HTTP status. Anything else that escapes a handler is a bug and becomes
INTERNAL (`as_gateway_error`), logged with its traceback, while the server keeps serving.

| exception            | Code               | gRPC               | HTTP |
|----------------------|--------------------|--------------------|------|
| InvalidInput         | INVALID_ARGUMENT   | INVALID_ARGUMENT   | 400  |
| UnknownTask          | INVALID_ARGUMENT   | INVALID_ARGUMENT   | 400  |
| ImageTooLarge        | INVALID_ARGUMENT   | INVALID_ARGUMENT   | 400  |
| MessageTooLarge      | PAYLOAD_TOO_LARGE  | INVALID_ARGUMENT   | 413  |
| UnsupportedMediaType | UNSUPPORTED_MEDIA  | INVALID_ARGUMENT   | 415  |
| ModelNotFound        | NOT_FOUND          | NOT_FOUND          | 404  |
| QueueFull            | RESOURCE_EXHAUSTED | RESOURCE_EXHAUSTED | 429  |
| DeadlineExceeded     | DEADLINE_EXCEEDED  | DEADLINE_EXCEEDED  | 504  |
| ModelNotReady        | UNAVAILABLE        | UNAVAILABLE        | 503  |
| ShuttingDown         | UNAVAILABLE        | UNAVAILABLE        | 503  |
| BackendUnavailable   | UNAVAILABLE        | UNAVAILABLE        | 503  |
| (anything else)      | INTERNAL           | INTERNAL           | 500  |
"""

from __future__ import annotations

import enum
import logging
import time

import grpc

from parsimony.wire import STATUSES, Status

log = logging.getLogger("serving.server")


class _StatusCode(enum.Enum):
    """A status in both protocols (the members come from `parsimony.wire.STATUSES`)."""

    @property
    def status(self) -> Status:
        return self.value

    @property
    def grpc(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.value.grpc]

    @property
    def grpc_name(self) -> str:
        """The gRPC status name: what gRPC answers with and the metrics' ``code`` label."""
        return self.value.grpc

    @property
    def http(self) -> int:
        return self.value.http


Code = _StatusCode("Code", [(s.name, s) for s in STATUSES])


class GatewayError(Exception):
    """Base of the vocabulary; ``str(exc)`` is the message sent to the caller."""

    code = Code.INTERNAL


class InvalidInput(GatewayError):
    """The request itself is wrong (undecodable image, wrong size, channels or dtype, bad option)."""

    code = Code.INVALID_ARGUMENT


class UnknownTask(InvalidInput):
    pass


class ImageTooLarge(InvalidInput):
    pass


class MessageTooLarge(InvalidInput):
    code = Code.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(InvalidInput):
    code = Code.UNSUPPORTED_MEDIA


class ModelNotFound(GatewayError):
    code = Code.NOT_FOUND


class QueueFull(GatewayError):
    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(GatewayError):
    code = Code.DEADLINE_EXCEEDED


class ModelNotReady(GatewayError):
    code = Code.UNAVAILABLE


class ShuttingDown(GatewayError):
    """The server is draining: the call did not run; the client retries (on another replica) after ``retry_after_s``."""

    code = Code.UNAVAILABLE
    retry_after_s = 1.0


class BackendUnavailable(GatewayError):
    """The remote backend (Triton) cannot be reached or is not ready; clients retry with backoff."""

    code = Code.UNAVAILABLE


class ModelLoadError(RuntimeError):
    """A model version could not be loaded (startup fails; a hot swap keeps the old version)."""


class StartupError(RuntimeError):
    """The server cannot start as configured (a busy port, an empty repository, unreadable certificates)."""


def answered_codes() -> list[Code]:
    """The error codes the gateway answers with: those of its exceptions, and INTERNAL for the rest
    (the wire's table also names statuses only proxies or clients produce)."""
    found, pending = {Code.INTERNAL}, [GatewayError]
    while pending:
        cls = pending.pop()
        found.add(cls.code)
        pending += cls.__subclasses__()
    return [code for code in Code if code in found]


def shown(text: str, limit: int = 64) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters: never echo a whole request field."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class RateLimitedLog:
    """One warning line per ``interval_s`` at most, saying how many were suppressed meanwhile: client
    mistakes are worth a line in the log, but must not let anyone flood it."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last such line)" if self._suppressed else ""
        self.logger.warning("%s%s", message, more)
        self._last, self._suppressed = now, 0


def as_gateway_error(exc: BaseException) -> GatewayError:
    """``exc`` itself when it is part of the vocabulary, else an INTERNAL error (logged here, once)."""
    if isinstance(exc, GatewayError):
        return exc
    log.error("internal error while serving a request", exc_info=exc)
    return GatewayError(f"internal error ({type(exc).__name__}: {exc}); the server logged the traceback")
