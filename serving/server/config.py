"""The gateway's settings: one validated object built from the command line (or by tests directly)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.server import triton_backend  # noqa: F401  (registers the "triton" backend)
from serving.server.backend import BACKENDS

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
    max_queue: int = Field(128, ge=1)
    max_message_bytes: int = Field(8 << 20, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
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
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {sorted(BACKENDS)}")
        if (self.backend == "triton") != (self.triton_url is not None):
            raise ValueError("--backend triton needs --triton-url HOST:PORT (Triton's gRPC endpoint), and "
                             "--triton-url is only used with --backend triton")
        return self

    def backend_options(self) -> dict:
        """The chosen backend's constructor options."""
        if self.backend == "triton":
            return {"url": self.triton_url, "concurrency": self.triton_concurrency,
                    "load_timeout_s": self.triton_load_timeout_s, "warmup_batch_sizes": self.warmup_batch_sizes}
        return {"threads": self.threads, "spinning": self.ort_spinning, "warmup_batch_sizes": self.warmup_batch_sizes}
