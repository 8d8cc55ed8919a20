"""uvicorn's HTTP/1.1 protocol (h11) with the limits a server facing untrusted clients needs.

- **Request head size**: a request line plus headers over ``max_header_bytes`` gets ``431 Request
  Header Fields Too Large`` with a message (h11 alone would answer 400 with none, and often the
  client, still sending, only sees the connection reset).
- **Header-read timeout**: a connection gets ``header_timeout_s`` to send a request's complete head,
  from when it opens and from the first byte of each later request; otherwise ``408`` (or, when it
  sent nothing at all, a plain close). This ends slow-header ("slowloris") and silent connections;
  idle keep-alive connections are closed after uvicorn's ``timeout_keep_alive``.
- **Connection cap**: beyond ``max_connections`` open connections a new one gets ``503`` and is closed.

Every refusal is a JSON error like the app's (``{"error": {"code", "message"}}``) with
``Connection: close``; the server then reads and drops what the client still sends for up to
``linger_s`` before closing, so that a client busy sending a large head still reads the answer.
Refusals are logged as one rate-limited line, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.server.errors import RateLimitedLog

log = logging.getLogger("serving.server")
_refusals = RateLimitedLog(log)


class _HeadLimitedConnection(h11.Connection):
    """h11's connection refusing a request head over ``max_head`` bytes, however it arrived: h11
    itself checks only a head still incomplete, so a large one arriving in one read would pass."""

    def __init__(self, max_head: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.refused_status = 400

    def next_event(self):
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refused_status = exc.error_status_hint  # 431 when the incomplete head grew too large
            raise
        if isinstance(event, h11.Request):
            size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) + 12
            if size > self.max_head:
                self.refused_status = 431
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


class LimitedH11Protocol(H11Protocol):
    """Subclass with the limits set as class attributes (`with_limits` makes one per server)."""

    max_header_bytes = 64 << 10
    header_timeout_s = 10.0
    max_connections = 1000
    linger_s = 2.0

    @classmethod
    def with_limits(cls, *, max_header_bytes: int, header_timeout_s: float, max_connections: int) -> type:
        return type(cls.__name__, (cls,), {"max_header_bytes": max_header_bytes,
                                           "header_timeout_s": header_timeout_s,
                                           "max_connections": max_connections})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadLimitedConnection(self.max_header_bytes)
        self._head_bytes = 0  # bytes received since the current request began, while its head is incomplete
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "UNAVAILABLE",
                         f"the server has {len(self.connections) - 1} connections open, its limit "
                         f"(--max-connections); retry with backoff or on another replica")
            return
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering after a refusal: drop what the client still sends
            return
        if self.conn.their_state is h11.IDLE:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._start_head_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete
            self._head_bytes = 0
            self._stop_head_timer()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: say why, with the right status."""
        if self.conn.refused_status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "INVALID_ARGUMENT",
                         f"the request's head (request line and headers) is over the server's limit of "
                         f"{self.max_header_bytes} bytes (--max-header-bytes); send fewer or shorter headers")
        else:
            self._refuse(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                         "the request is not valid HTTP/1.1 (malformed request line, header or framing)")

    def shutdown(self) -> None:
        if self._refused:
            self.transport.close()
            return
        super().shutdown()

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()  # silent since it opened (or since its last answer): just close
            return
        self._refuse(HTTPStatus.REQUEST_TIMEOUT, "DEADLINE_EXCEEDED",
                     f"the request's headers did not arrive within {self.header_timeout_s:g} s "
                     f"(--header-timeout-s); send the whole request head at once")

    def _refuse(self, status: HTTPStatus, code: str, message: str) -> None:
        """Answer ``status`` with a JSON error and close (after lingering), whatever h11's state."""
        self._stop_head_timer()
        self._refused = True
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        _refusals.warning(f"HTTP: refused {client} with {status.value}: {message}")
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        head = (f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("ascii")
        self.transport.write(head + body)
        self.loop.call_later(self.linger_s, self.transport.close)
