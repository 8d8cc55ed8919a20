"""`Client` (blocking) and `AsyncClient` (asyncio) for the prediction gateway, over gRPC or HTTP.

Both have the same methods, defined once in `_Methods`: each builds a protocol-neutral `Call`
(`clients.calls`) and hands it to ``_call``, which runs it through the transport with deadline and
retries. On `AsyncClient` ``_call`` is a coroutine function, so the very same methods return
awaitables there::

    with Client("localhost:50051") as client:               # or "http://localhost:8080"
        info = client.get_model("scenes")
        p = client.predict("scenes", "image.png", tasks=["depth"], timeout=2.0)
        p.outputs["depth"], p.timings["total_ms"]

    async with AsyncClient("localhost:8080", protocol="http") as client:
        p = await client.predict("scenes", pixels)           # numpy uint8 [H, W, 3]

``timeout`` (seconds, per call, else the client's) is the deadline of the whole call, retries
included (the server caps a deadline at its ``--max-deadline-s``). Errors raise `ClientError` whatever the protocol.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from clients import calls
from clients.calls import Call, ImageInput
from clients.errors import ClientError
from clients.retry import NO_RETRY, Attempts, RetryPolicy
from clients.transport import (
    TLS,
    AsyncGrpcTransport,
    AsyncHttpTransport,
    Endpoint,
    GrpcTransport,
    HttpTransport,
    endpoint,
)
from clients.types import ModelInfo, Prediction

DEFAULT_TIMEOUT = 30.0  # seconds: the deadline of a call that names none
DEFAULT_RETRY = RetryPolicy()
READY_POLL = RetryPolicy(max_attempts=None, initial_backoff=0.05, max_backoff=0.5)


class _Methods:
    """The API, shared by both clients (on `AsyncClient` every method returns an awaitable)."""

    def __init__(self, server: str, *, protocol: str | None = None, tls: TLS | bool | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: RetryPolicy = DEFAULT_RETRY,
                 grpc_options: Sequence[tuple] = (), connections: int | None = None) -> None:
        """``server``: an address (see `clients.transport`); ``timeout``: default deadline per call in seconds
        (None: none); ``retry``: what to do on UNAVAILABLE; ``connections``: HTTP connection pool size."""
        self.endpoint: Endpoint = endpoint(server, protocol, tls)
        self.timeout = timeout
        self.retry = retry
        self._grpc_options = tuple(grpc_options)
        self._connections = connections

    @property
    def protocol(self) -> str:
        return self.endpoint.protocol

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint.url!r}, protocol={self.protocol!r})"

    def predict(self, model: str, image: ImageInput, *, tasks: Sequence[str] | None = None,
                output_dtype: str = "float32", probabilities: bool = False,
                segmentation_probabilities: bool = False, timeout: float | None = None) -> Prediction:
        """Every task's output (or ``tasks``') for one image of exactly the model's input size; with
        ``probabilities`` (or its older name ``segmentation_probabilities``) also each task's optional
        probability map, in `Prediction.probabilities`."""
        call = calls.predict(model, image, tasks, output_dtype, probabilities or segmentation_probabilities)
        return self._call(call, timeout)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return self._call(calls.list_models(), timeout)

    def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """Tasks (kinds, class and attribute names), input size and version of one served model."""
        return self._call(calls.get_model(name), timeout)

    def ready(self, *, timeout: float | None = None) -> bool:
        """Whether every model is loaded and warmed up; an unreachable server raises UNAVAILABLE."""
        return self._call(calls.ready(), timeout, NO_RETRY)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Poll readiness until the server is ready (True) or ``timeout`` passes (ClientError UNAVAILABLE)."""
        return self._call(calls.ready(require=True), timeout, READY_POLL)

    def _call(self, call: Call, timeout: float | None, retry: RetryPolicy | None = None):
        raise NotImplementedError

    def _attempts(self, call: Call, timeout: float | None, retry: RetryPolicy | None) -> Attempts:
        return Attempts(retry or self.retry, self.timeout if timeout is None else timeout, idempotent=call.idempotent)


class Client(_Methods):
    """Blocking client; thread-safe (one gRPC channel or one HTTP connection pool)."""

    def __init__(self, server: str, **options) -> None:
        super().__init__(server, **options)
        if self.protocol == "grpc":
            self._transport = GrpcTransport(self.endpoint, self._grpc_options)
        else:
            self._transport = HttpTransport(self.endpoint, self._connections or 16)

    def _call(self, call: Call, timeout: float | None, retry: RetryPolicy | None = None):
        attempts = self._attempts(call, timeout, retry)
        while True:
            try:
                return self._transport.invoke(call, attempts.remaining())
            except ClientError as error:
                time.sleep(attempts.wait_after(error))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Methods):
    """asyncio client (grpc.aio or httpx.AsyncClient); use it from one event loop. The connection is
    made on the first call, inside the running loop."""

    def __init__(self, server: str, **options) -> None:
        super().__init__(server, **options)
        self._transport: AsyncGrpcTransport | AsyncHttpTransport | None = None

    def _open(self) -> AsyncGrpcTransport | AsyncHttpTransport:
        if self._transport is None:
            if self.protocol == "grpc":
                self._transport = AsyncGrpcTransport(self.endpoint, self._grpc_options)
            else:
                self._transport = AsyncHttpTransport(self.endpoint, self._connections or 100)
        return self._transport

    async def _call(self, call: Call, timeout: float | None, retry: RetryPolicy | None = None):
        transport, attempts = self._open(), self._attempts(call, timeout, retry)
        while True:
            try:
                return await transport.invoke(call, attempts.remaining())
            except ClientError as error:
                await asyncio.sleep(attempts.wait_after(error))

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
