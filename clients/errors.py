"""One exception for every failure a client call can end in, whichever protocol carried it.

`ClientError.code` is always a gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``, ...), so code
that handles errors does not care whether it talks gRPC or HTTP; ``http_status`` is the HTTP
status when the call went over HTTP (else None). The message is the server's own (it says what was
wrong and how to fix it); failures on the client's side of the wire map as the gRPC library maps
them: nothing listening or the connection dropped -> UNAVAILABLE, the deadline passed ->
DEADLINE_EXCEEDED.

An HTTP error status whose body names no gRPC code (a proxy's page, an empty body) maps through
`parsimony.wire.HTTP_TO_GRPC`, the table the gateway answers by (e.g. 413 -> INVALID_ARGUMENT,
502 and 503 -> UNAVAILABLE); a status nothing maps is UNKNOWN.
"""

from __future__ import annotations

import grpc
import httpx

from parsimony.wire import grpc_name_for_http

GRPC_CODES = frozenset(code.name for code in grpc.StatusCode)


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
    code = body_code if body_code in GRPC_CODES else grpc_name_for_http(status)
    return ClientError(code, message or f"HTTP {status} {response.reason_phrase}", http_status=status)


def from_transport(exc: httpx.TransportError, url: str) -> ClientError:
    """An HTTP call that got no answer: timeouts are DEADLINE_EXCEEDED, the rest (refused, reset) UNAVAILABLE."""
    if isinstance(exc, httpx.TimeoutException):
        return ClientError("DEADLINE_EXCEEDED", f"no answer from {url} within the deadline ({type(exc).__name__})")
    return ClientError("UNAVAILABLE", f"cannot reach {url} ({type(exc).__name__}: {exc})")
