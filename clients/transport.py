"""Where calls go: the server address, TLS, and four thin transports that execute a `Call`.

Addresses: ``host:port`` (gRPC unless ``protocol="http"``), ``grpc://host:port``,
``grpcs://host:port`` (gRPC over TLS), ``http://host:port`` and ``https://host:port``. TLS is on
for the ``grpcs``/``https`` schemes or when a `TLS` is given: ``TLS()`` checks the server's
certificate against the system's roots, ``TLS(ca="ca.pem")`` against the given roots, and
``cert``/``key`` add a client certificate (mutual TLS). The certificate must name the host the
client connects to.

Transports do one attempt of one call within ``timeout`` seconds and turn every failure into a
`ClientError`; gRPC sends the deadline with the call, HTTP in the gateway's ``X-Timeout-Ms`` header
and as httpx's timeout. Sync transports use ``grpc`` and ``httpx.Client``, async ones ``grpc.aio``
and ``httpx.AsyncClient``; request building and answer reading are shared.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from clients import errors
from clients.calls import Call

PROTOCOLS = ("grpc", "http")
_SCHEMES = {"grpc": ("grpc", False), "grpcs": ("grpc", True), "http": ("http", False), "https": ("http", True)}
# unlimited message sizes (a 480x640 normal map alone is 3.7 MB, over gRPC's 4 MB default); reconnect
# quickly after a refused connection so that a retry can find a server that has just come up
GRPC_OPTIONS = (("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000))


@dataclass(frozen=True)
class TLS:
    """TLS settings: trusted roots ``ca`` (PEM; default: the system's) and an optional client ``cert`` + ``key``."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key (PEM files)")

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=None if self.ca is None else str(self.ca))
        if self.cert is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # grpc | http
    address: str  # host:port
    tls: TLS | None

    @property
    def url(self) -> str:
        """HTTP's base URL, or gRPC's target."""
        if self.protocol == "grpc":
            return self.address
        return f"{'https' if self.tls else 'http'}://{self.address}"


def endpoint(server: str, protocol: str | None = None, tls: TLS | bool | None = None) -> Endpoint:
    """Resolve an address, a protocol and TLS settings; contradictions are refused."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    scheme, sep, address = server.partition("://")
    if not sep:
        scheme, address = None, server
    elif scheme not in _SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r} in {server!r}; use one of {sorted(_SCHEMES)} or host:port")
    address = address.rstrip("/")
    if ":" not in address or "/" in address:
        raise ValueError(f"the server address must be host:port (optionally with a scheme), got {server!r}")
    implied, secure = _SCHEMES[scheme] if scheme else (protocol or "grpc", False)
    if protocol is not None and protocol != implied:
        raise ValueError(f"{server!r} is a {implied} address but protocol={protocol!r} was asked for")
    if scheme in ("http", "grpc") and tls:
        raise ValueError(f"{server!r} is plaintext but TLS settings were given; use the {scheme}s:// scheme")
    if tls is True or (secure and not tls):
        tls = TLS()
    return Endpoint(implied, address, tls or None)


class _Grpc:
    def __init__(self, end: Endpoint, options: tuple, module) -> None:
        options = list(GRPC_OPTIONS) + list(options)
        if end.tls is None:
            self.channel = module.insecure_channel(end.address, options=options)
        else:
            self.channel = module.secure_channel(end.address, end.tls.grpc_credentials(), options=options)
        self._methods: dict = {}
        self.closed = False

    def error(self, exc: grpc.RpcError) -> errors.ClientError:
        error = errors.from_grpc(exc)
        error.local = self.closed  # calls cut by our own close() are not the server's doing
        return error

    def method(self, call: Call):
        method = self._methods.get(call.grpc_method)
        if method is None:
            method = self._methods[call.grpc_method] = self.channel.unary_unary(
                call.grpc_method, request_serializer=type(call.grpc_request).SerializeToString,
                response_deserializer=call.grpc_response.FromString)
        return method


class GrpcTransport(_Grpc):
    def __init__(self, end: Endpoint, options: tuple = ()) -> None:
        super().__init__(end, options, grpc)

    def invoke(self, call: Call, timeout: float | None):
        try:
            reply = self.method(call)(call.grpc_request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        return call.from_grpc(reply)

    def close(self) -> None:
        self.closed = True
        self.channel.close()


class AsyncGrpcTransport(_Grpc):
    def __init__(self, end: Endpoint, options: tuple = ()) -> None:
        super().__init__(end, options, grpc.aio)

    async def invoke(self, call: Call, timeout: float | None):
        try:
            reply = await self.method(call)(call.grpc_request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None
        return call.from_grpc(reply)

    async def close(self) -> None:
        self.closed = True
        await self.channel.close()


class _Http:
    def __init__(self, end: Endpoint, connections: int, factory) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        verify = True if end.tls is None else end.tls.ssl_context()
        self.client = factory(base_url=end.url, verify=verify, limits=limits, timeout=None)

    def request(self, call: Call, timeout: float | None) -> httpx.Request:
        args = dict(call.http_args)
        headers = dict(args.pop("headers", {}))
        if timeout is not None:
            headers["X-Timeout-Ms"] = f"{timeout * 1e3:.3f}"
        return self.client.build_request(call.http_method, call.http_path, headers=headers, timeout=timeout, **args)

    @staticmethod
    def read(call: Call, response: httpx.Response):
        if response.status_code not in call.http_ok:
            raise errors.from_http(response)
        return call.from_http(response)


class HttpTransport(_Http):
    def __init__(self, end: Endpoint, connections: int = 16) -> None:
        super().__init__(end, connections, httpx.Client)

    def invoke(self, call: Call, timeout: float | None):
        request = self.request(call, timeout)
        try:
            response = self.client.send(request)
        except httpx.TransportError as exc:
            raise errors.from_transport(exc, str(request.url)) from None
        return self.read(call, response)

    def close(self) -> None:
        self.client.close()


class AsyncHttpTransport(_Http):
    def __init__(self, end: Endpoint, connections: int = 100) -> None:
        super().__init__(end, connections, httpx.AsyncClient)

    async def invoke(self, call: Call, timeout: float | None):
        request = self.request(call, timeout)
        try:
            response = await self.client.send(request)
        except httpx.TransportError as exc:
            raise errors.from_transport(exc, str(request.url)) from None
        return self.read(call, response)

    async def close(self) -> None:
        await self.client.aclose()
