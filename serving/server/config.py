"""The gateway's settings: one validated object built from the command line (or by tests directly).

`ServerConfig` is the one place every default lives: the command line's ``--help``, the batcher and
the backends read theirs from it (`default`), so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8080


class ServerConfig(BaseModel):
    """Every setting of `python -m serving.server`; unknown keys are refused, values range-checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repository: Path | None = Field(None, description="model repository: REPO/NAME/<version>/model.onnx")
    run: Path | None = Field(None, description="an exported run directory (model.onnx + manifest.json)")
    models: tuple[str, ...] = Field((), description="models to serve (default: every model in the repository)")
    host: str = "0.0.0.0"
    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535)
    http_port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535)
    backend: str = Field("onnxruntime", description="onnxruntime (in process) or triton (--triton-url)")
    triton_url: str | None = Field(None, description="Triton's gRPC endpoint, host:port (--backend triton)")
    triton_concurrency: int = Field(4, ge=1, le=256, description="batches in flight to Triton at once")
    triton_load_timeout_s: float = Field(300.0, gt=0, description="longest wait for Triton to report a model ready")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: one per physical core)")
    ort_spinning: Literal["run", "always", "never"] = Field(
        "run", description="when ONNX Runtime's threads busy-wait for work: during a forward pass only, always, never")
    max_batch: int = Field(16, ge=1, le=1024)
    max_queue_delay_ms: float = Field(0.0, ge=0, le=10_000)
    max_queue: int = Field(128, ge=1, description="queued requests per model before RESOURCE_EXHAUSTED/429")
    max_message_bytes: int = Field(8 << 20, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    # limits and timeouts of both front ends
    max_deadline_s: float = Field(60.0, gt=0, description="longest deadline a request gets; longer or absent "
                                                         "ones are capped (the response says so)")
    max_header_bytes: int = Field(64 << 10, ge=1024, description="largest HTTP request head (request line and "
                                                                  "headers), else 431; gRPC metadata likewise")
    header_timeout_s: float = Field(10.0, gt=0, description="time a new connection has to send a request's "
                                                            "headers (HTTP) or finish its handshake (gRPC)")
    idle_timeout_s: float = Field(60.0, gt=0, description="connections with no request for this long are closed")
    max_connection_age_s: float = Field(600.0, ge=0, description="gRPC connections are asked to reconnect after "
                                                                 "this long (spreads load over replicas; 0: never)")
    max_connection_age_grace_s: float = Field(30.0, ge=0, description="time calls in flight on such a "
                                                                      "connection get to finish")
    keepalive_time_s: float = Field(60.0, gt=0, description="gRPC: ping an idle client after this long")
    keepalive_timeout_s: float = Field(20.0, gt=0, description="gRPC: close a connection whose ping is not "
                                                               "answered within this long")
    min_ping_interval_s: float = Field(10.0, ge=0, description="gRPC: clients pinging more often than this "
                                                               "are disconnected")
    max_connections: int = Field(1000, ge=1, description="concurrent connections per protocol")
    max_concurrent_streams: int = Field(100, ge=1, description="gRPC: concurrent calls per connection")
    # TLS
    tls_cert: Path | None = Field(None, description="server certificate chain (PEM); with tls_key: TLS on both ports")
    tls_key: Path | None = Field(None, description="the certificate's private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA bundle (PEM) client certificates must chain to; "
                                                         "given: mutual TLS, clients without one are refused")
    tls_reload_s: float = Field(10.0, ge=0, description="how often certificate files are checked for a rotation "
                                                        "(0: never)")
    docs: bool = Field(False, description="serve the OpenAPI browser at /docs")
    poll_interval_s: float = Field(2.0, ge=0, description="repository poll period for new versions (0: off)")
    grace_period_s: float = Field(30.0, gt=0, description="SIGTERM: longest wait for in-flight requests")
    drain_delay_s: float = Field(0.0, ge=0, description="SIGTERM: report not-ready this long before closing")
    warmup_batch_sizes: tuple[int, ...] = (1,)

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if (self.repository is None) == (self.run is None):
            raise ValueError("give exactly one of --repository (a model repository) and --run (an exported run)")
        if self.run is not None and len(self.models) > 1:
            raise ValueError("--run serves one model: give at most one --model (its name)")
        from serving.server.models import BACKENDS  # the backends register themselves there

        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {sorted(BACKENDS)}")
        if (self.backend == "triton") != (self.triton_url is not None):
            raise ValueError("--backend triton needs --triton-url HOST:PORT (Triton's gRPC endpoint), and "
                             "--triton-url is only used with --backend triton")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (PEM files)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path} is not a file")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def backend_options(self) -> dict:
        """The chosen backend's constructor options."""
        if self.backend == "triton":
            return {"url": self.triton_url, "concurrency": self.triton_concurrency,
                    "load_timeout_s": self.triton_load_timeout_s, "warmup_batch_sizes": self.warmup_batch_sizes}
        return {"threads": self.threads, "spinning": self.ort_spinning, "warmup_batch_sizes": self.warmup_batch_sizes}


def default(name: str):
    """The default of setting ``name`` (the single source the parser, batcher and backends use)."""
    return ServerConfig.model_fields[name].default
