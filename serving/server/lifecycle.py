"""The server's life: start both front ends, load and warm up, serve, drain on SIGTERM.

States: STARTING (listening, so liveness and the health service answer, but not ready: models
load and warm up) -> READY (gRPC health SERVING, ``/readyz`` 200) -> DRAINING (on SIGTERM or
SIGINT: health NOT_SERVING and ``/readyz`` 503 at once; after ``drain_delay``, during which calls are
still served while load balancers take the replica out, new calls are refused with UNAVAILABLE/503
and a retry hint, both listeners close, and the in-flight calls get up to ``grace_period`` to finish,
their batches still running) -> STOPPED (models closed). gRPC (grpc.aio) and HTTP (uvicorn) share one
event loop.

No call is cancelled by the drain: a call either ran to its end or was refused before it started
(UNAVAILABLE: never run, safe to retry). The one race left is in grpc itself: a call that reaches
the server in the instant its listener closes is cancelled by grpc; the project's client retries
such a CANCELLED for its (idempotent) calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import socket

import uvicorn
from grpc_health.v1 import health, health_pb2

from serving.server import codec, grpc_service
from serving.server.config import ServerConfig
from serving.server.errors import StartupError
from serving.server.http_app import create_app
from serving.server.http_protocol import LimitedH11Protocol
from serving.server.metrics import GatewayMetrics
from serving.server.models import (
    BatchingOptions,
    ModelManager,
    RepositorySource,
    RunSource,
    repository_models,
)
from serving.server.service import Gateway, Limits
from serving.server.tls import CertificateFiles, http_ssl_context

log = logging.getLogger("serving.server")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


def build_sources(config: ServerConfig) -> list:
    if config.run is not None:
        return [RunSource(config.run, config.models[0] if config.models else config.run.resolve().name)]
    names = config.models or tuple(repository_models(config.repository))
    if not names:
        raise StartupError(f"model repository {config.repository} holds no model with a version; convert a run into it "
                         f"with `python -m serving.convert RUN_DIR --repository {config.repository} --name NAME`")
    return [RepositorySource(config.repository, name) for name in names]


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: signals are the lifecycle's to handle, not uvicorn's."""

    def capture_signals(self):
        return contextlib.nullcontext()


class GatewayServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        batching = BatchingOptions(max_batch=config.max_batch, max_delay_s=config.max_queue_delay_ms / 1e3,
                                   max_queue=config.max_queue)
        self.models = ModelManager(build_sources(config), self.metrics, backend=config.backend,
                                   backend_options=config.backend_options(),
                                   batching=batching, poll_interval_s=config.poll_interval_s)
        self.gateway = Gateway(self.models, self.metrics,
                               Limits(config.max_message_bytes, config.max_image_pixels, config.max_deadline_s))
        self.certificates = None if not config.tls else CertificateFiles(
            config.tls_cert, config.tls_key, config.tls_client_ca, config.tls_reload_s)
        self.health = health.aio.HealthServicer()
        self.state = State.STARTING
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._grpc = None
        self.app = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._stopping: asyncio.Task | None = None
        self._health_watch: asyncio.Task | None = None
        self._tls_watch: asyncio.Task | None = None

    def readiness(self) -> tuple[bool, dict]:
        served = {m.metadata.name: m.metadata.version for m in self.models.served()}
        details = {"status": self.state.value, "models": served}
        if self.state is not State.READY:
            return False, details
        not_ready = self.models.not_ready()
        if not_ready:
            details.update(status="backend-unavailable", not_ready=not_ready)
        return not not_ready, details

    async def start(self) -> None:
        """Listen on both ports, then load and warm up every model; READY when this returns."""
        await self._set_health(NOT_SERVING)
        try:
            await self._start_grpc()
            await self._start_http()
            codec.warm_up()
            await self.models.start()
        except BaseException:
            await self.stop(grace=1)  # nothing is in flight yet: returns at once
            raise
        if self.state is not State.STARTING:  # a SIGTERM arrived while loading: stay down
            return
        self.state = State.READY
        await self._set_health(SERVING)
        self._health_watch = asyncio.get_running_loop().create_task(self._follow_backends(), name="health")
        names = ", ".join(f"{m.metadata.name} v{m.metadata.version}" for m in self.models.served())
        log.info("ready: %s; gRPC on %s:%d, HTTP on %s:%d", names, self.config.host, self.grpc_port,
                 self.config.host, self.http_port)

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, drain, stop."""
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: self._on_signal(s, stopped))
        await self.start()
        await stopped.wait()
        await self._stopping

    def _on_signal(self, sig: int, stopped: asyncio.Event) -> None:
        log.info("received %s: draining (grace period %.1f s)", signal.Signals(sig).name, self.config.grace_period_s)
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.stop())
            self._stopping.add_done_callback(lambda _: stopped.set())

    async def stop(self, grace: float | None = None) -> None:
        """Drain: not ready at once, then stop taking calls and finish in-flight ones within ``grace``."""
        if self.state in (State.DRAINING, State.STOPPED):
            return
        grace = self.config.grace_period_s if grace is None else grace
        self.state = State.DRAINING
        if self._health_watch is not None:
            self._health_watch.cancel()
        self.models.flush()
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay_s and grace:
            await asyncio.sleep(self.config.drain_delay_s)
        self.gateway.accepting = False
        if self._tls_watch is not None:
            self._tls_watch.cancel()
        waits = []
        if self._grpc is not None:
            waits.append(self._grpc.stop(grace))
        if self._http is not None:
            self._http.config.timeout_graceful_shutdown = grace
            self._http.should_exit = True
            waits.append(self._http_task)
        await asyncio.gather(*waits, return_exceptions=True)
        await self.models.close()
        self.state = State.STOPPED
        log.info("stopped")

    async def _follow_backends(self, period_s: float = 0.25) -> None:
        """While READY, the gRPC health status follows the backends (a remote Triton can go away and return)."""
        serving = True
        while self.state is State.READY:
            await asyncio.sleep(period_s)
            not_ready = self.models.not_ready()
            if serving == bool(not_ready) and self.state is State.READY:
                serving = not not_ready
                await self._set_health(SERVING if serving else NOT_SERVING)
                if serving:
                    log.info("health: SERVING")
                else:
                    log.warning("health: NOT_SERVING: %s", not_ready)

    async def _set_health(self, status) -> None:
        for service in ("", grpc_service.SERVICE):
            await self.health.set(service, status)

    async def _start_grpc(self) -> None:
        self._grpc = grpc_service.build_server(self.gateway, self.health, self.config)
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        address = f"{host}:{self.config.grpc_port}"
        try:
            if self.certificates is None:
                self.grpc_port = self._grpc.add_insecure_port(address)
            else:
                self.grpc_port = self._grpc.add_secure_port(address, self.certificates.grpc_credentials())
        except RuntimeError as exc:
            raise StartupError(f"cannot listen for gRPC on {host}:{self.config.grpc_port} ({exc}); is the port in use? "
                          f"choose another with --grpc-port") from exc
        await self._grpc.start()

    async def _reload_tls(self, context) -> None:
        """Renewed certificate files go into the HTTP server's context (gRPC checks them itself)."""
        while True:
            await asyncio.sleep(self.config.tls_reload_s)
            self.certificates.reload_context(context)

    async def _start_http(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        try:
            sock = socket.create_server((self.config.host, self.config.http_port), family=family)
        except OSError as exc:
            raise StartupError(f"cannot listen for HTTP on {self.config.host}:{self.config.http_port} ({exc}); "
                          f"is the port in use? choose another with --http-port") from exc
        # asyncio sets TCP_NODELAY only on sockets it creates itself: without it, the second write of
        # every response on a kept-alive connection waits for the client's delayed ACK (~40 ms)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.http_port = sock.getsockname()[1]
        self.app = create_app(self.gateway, self.readiness, docs=self.config.docs)
        c = self.config
        protocol = LimitedH11Protocol.with_limits(max_header_bytes=c.max_header_bytes,
                                                  header_timeout_s=c.header_timeout_s,
                                                  max_connections=c.max_connections)
        tls = {}
        if self.certificates is not None:
            context = http_ssl_context(self.certificates)
            tls["ssl_context_factory"] = lambda _config, _default: context
            if c.tls_reload_s > 0:
                self._tls_watch = asyncio.get_running_loop().create_task(self._reload_tls(context), name="tls")
        # log_level error: uvicorn's per-request warnings (malformed requests) are ours to log, rate-limited
        config = uvicorn.Config(self.app, log_level="error", access_log=False, lifespan="off", http=protocol,
                                timeout_graceful_shutdown=c.grace_period_s, timeout_keep_alive=c.idle_timeout_s,
                                h11_max_incomplete_event_size=c.max_header_bytes, server_header=False, **tls)
        self._http = _EmbeddedUvicorn(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve(sockets=[sock]), name="http")
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
