"""One exception for every failure a client call can end in, whichever protocol carried it.

`ClientError.code` is always a gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``, ...), so code
that handles errors does not care whether it talks gRPC or HTTP; ``http_status`` is the HTTP
status when the call went over HTTP (else None). The message is the server's own (it says what was
wrong and how to fix it); failures on the client's side of the wire map as the gRPC library maps
them: nothing listening or the connection dropped -> UNAVAILABLE, the deadline passed ->
DEADLINE_EXCEEDED.

| HTTP status              | code               |
|--------------------------|--------------------|
| 400, 413, 415, 422       | INVALID_ARGUMENT   |
| 404                      | NOT_FOUND          |
| 429                      | RESOURCE_EXHAUSTED |
| 499                      | CANCELLED          |
| 500                      | INTERNAL           |
| 501                      | UNIMPLEMENTED      |
| 502, 503                 | UNAVAILABLE        |
| 504                      | DEADLINE_EXCEEDED  |
"""

from __future__ import annotations

import grpc
import httpx

GRPC_CODES = frozenset(code.name for code in grpc.StatusCode)
_HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
               429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
               502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class ClientError(Exception):
    """A failed call: ``code`` (gRPC status name), ``http_status`` (HTTP only), ``str(exc)`` the message."""

    def __init__(self, code: str, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.attempts = 1  # set by the retry loop: how many calls this error ended
        self.local = False  # the client caused it itself (it closed its channel): never retried

    @property
    def message(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        http = "" if self.http_status is None else f", http_status={self.http_status}"
        return f"ClientError({self.code}{http}: {self})"


def from_grpc(exc: grpc.RpcError) -> ClientError:
    """The error of a failed gRPC call (sync or grpc.aio: both carry ``code()`` and ``details()``)."""
    code = exc.code()
    return ClientError(code.name if code is not None else "UNKNOWN", exc.details() or str(exc))


def from_http(response: httpx.Response) -> ClientError:
    """The error of an HTTP answer with an error status; the gateway's body is ``{"error": {code, message}}``."""
    status = response.status_code
    body_code, message = "", response.text.strip()
    try:
        error = response.json().get("error", {})
        body_code, message = str(error.get("code", "")), str(error.get("message", message))
    except (ValueError, AttributeError):
        pass  # not the gateway's JSON (a proxy's page, an empty body): keep the text
    code = body_code if body_code in GRPC_CODES else _HTTP_CODES.get(status, "UNKNOWN")
    return ClientError(code, message or f"HTTP {status} {response.reason_phrase}", http_status=status)


def from_transport(exc: httpx.TransportError, url: str) -> ClientError:
    """An HTTP call that got no answer: timeouts are DEADLINE_EXCEEDED, the rest (refused, reset) UNAVAILABLE."""
    if isinstance(exc, httpx.TimeoutException):
        return ClientError("DEADLINE_EXCEEDED", f"no answer from {url} within the deadline ({type(exc).__name__})")
    return ClientError("UNAVAILABLE", f"cannot reach {url} ({type(exc).__name__}: {exc})")
