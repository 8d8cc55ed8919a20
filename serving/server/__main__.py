r"""`python -m serving.server`: the prediction gateway (gRPC + HTTP) for multi-task models.

    python -m serving.server --repository model_repository --model scenes
    python -m serving.server --run runs/demo                       # an exported run, served as version 1
    python -m serving.server --repository model_repository --model scenes \
        --backend triton --triton-url triton:8001                   # Triton runs the forward passes
    python -m serving.server --repository model_repository --model scenes \
        --grpc-port 50051 --http-port 8080 --max-batch 16 --max-queue-delay-ms 2 --threads 2
    python -m serving.server --run runs/demo --tls-cert tls.crt --tls-key tls.key \
        --tls-client-ca clients-ca.pem                               # TLS, clients need a certificate

Serves ``parsimony.v1.PredictionService`` (serving/proto/parsimony/v1/gateway.proto) over gRPC with
the standard health service and reflection, and the same operations over HTTP
(``POST /v1/models/NAME:predict``, ``GET /v1/models[/NAME]``, ``/healthz``, ``/readyz``,
``/metrics``, ``/docs``). Models run in ONNX Runtime inside this process with dynamic batching, or,
with ``--backend triton --triton-url HOST:PORT``, on a Triton server that serves the same repository
(the gateway still reads each version's manifest.json from it: mount the repository in both).
New versions appearing in the repository are loaded and swapped in without failing requests.

SIGTERM drains in-flight requests (up to --grace-period-s) and exits 0. The limits, timeouts and
TLS settings are described in docs/SERVING.md; every default below comes from
`serving.server.config.ServerConfig`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import pydantic

from parsimony.onnxrt import SPINNING
from serving.repository import RepositoryError
from serving.server.config import ServerConfig, default
from serving.server.errors import ModelLoadError, StartupError
from serving.server.lifecycle import GatewayServer
from serving.server.models import BACKENDS

log = logging.getLogger("serving.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = default
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--repository", type=Path, help="model repository (REPO/NAME/<version>/model.onnx)")
    source.add_argument("--run", type=Path, help="an exported run directory (model.onnx + manifest.json)")
    p.add_argument("--model", dest="models", action="append", metavar="NAME",
                   help="model to serve (repeatable; default: every model in the repository; with --run: its name)")
    p.add_argument("--host", help=f"address to listen on (default {d('host')})")
    p.add_argument("--grpc-port", type=int, help=f"gRPC port (default {d('grpc_port')}; 0 picks a free one)")
    p.add_argument("--http-port", type=int, help=f"HTTP port (default {d('http_port')}; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, help=f"largest dynamic batch (default {d('max_batch')})")
    p.add_argument("--max-queue-delay-ms", type=float,
                   help=f"hold a batch's first request up to this long for the batch to fill "
                        f"(default {d('max_queue_delay_ms'):g}: never wait)")
    p.add_argument("--max-queue", type=int,
                   help=f"queued requests per model before RESOURCE_EXHAUSTED/429 (default {d('max_queue')})")
    p.add_argument("--backend", choices=sorted(BACKENDS),
                   help=f"onnxruntime: run models in this process; triton: send batches to --triton-url "
                        f"(default {d('backend')})")
    p.add_argument("--triton-url", metavar="HOST:PORT",
                   help="Triton's gRPC endpoint (--backend triton); Triton must serve the same repository")
    p.add_argument("--triton-concurrency", type=int,
                   help=f"batches in flight to Triton at once (default {d('triton_concurrency')})")
    p.add_argument("--triton-load-timeout-s", type=float,
                   help=f"longest wait for Triton to report a model (version) ready "
                        f"(default {d('triton_load_timeout_s'):g})")
    p.add_argument("--threads", type=int,
                   help=f"ONNX Runtime intra-op threads (default {d('threads')}: one per physical core)")
    p.add_argument("--ort-spinning", choices=list(SPINNING),
                   help=f"when ONNX Runtime's intra-op threads busy-wait for work: run: during a forward pass "
                        f"only (fast hand-offs between ops, idle cores between requests), always (also between "
                        f"forward passes, taking the cores the event loop needs), never (default {d('ort_spinning')})")
    p.add_argument("--max-message-bytes", type=int, help=f"largest request accepted (default {d('max_message_bytes')})")
    p.add_argument("--max-image-pixels", type=int,
                   help=f"largest image accepted, in pixels (default {d('max_image_pixels')})")
    p.add_argument("--poll-interval-s", type=float,
                   help=f"repository poll period for new versions (default {d('poll_interval_s'):g}; 0: off)")
    p.add_argument("--grace-period-s", type=float,
                   help=f"SIGTERM: longest wait for in-flight requests (default {d('grace_period_s'):g})")
    p.add_argument("--drain-delay-s", type=float,
                   help=f"SIGTERM: report not-ready this long, still serving, before refusing new calls "
                        f"(default {d('drain_delay_s'):g})")
    _add_limits(p)
    _add_tls(p)
    p.add_argument("--docs", action="store_true", default=None,
                   help=f"serve the OpenAPI browser at /docs (its page loads Swagger UI from a CDN; default "
                        f"{'on' if d('docs') else 'off'}; /openapi.json is always served)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


# limits and timeouts: (flag, type, help); the default is appended from ServerConfig
LIMITS = (
    ("max-deadline-s", float, "longest deadline a request gets; longer or absent deadlines are capped to it and "
                              "the response metadata (x-deadline-capped-ms) says so"),
    ("max-header-bytes", int, "largest request head: HTTP answers 431 above it, gRPC refuses the metadata"),
    ("header-timeout-s", float, "time a connection has to send a request's headers (HTTP, else 408 and closed) "
                                "or to finish its handshake (gRPC)"),
    ("idle-timeout-s", float, "close connections without a request for this long"),
    ("max-connection-age-s", float, "gRPC: ask clients to reconnect after this long, which spreads them over "
                                    "replicas (0: never)"),
    ("max-connection-age-grace-s", float, "gRPC: calls in flight then get this long to finish"),
    ("keepalive-time-s", float, "gRPC: ping a client idle this long"),
    ("keepalive-timeout-s", float, "gRPC: drop a client not answering a ping within this long"),
    ("min-ping-interval-s", float, "gRPC: drop clients that ping more often than this"),
    ("max-connections", int, "concurrent connections per protocol; HTTP answers 503 above it"),
    ("max-concurrent-streams", int, "gRPC: concurrent calls per connection"),
)


def _add_limits(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("limits and timeouts (both protocols unless marked)")
    for flag, kind, text in LIMITS:
        value = default(flag.replace("-", "_"))
        group.add_argument(f"--{flag}", type=kind, help=f"{text} (default {value:g})" if kind is float
                           else f"{text} (default {value})")


def _add_tls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (both ports)")
    g.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM); with --tls-key: TLS on both ports")
    g.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    g.add_argument("--tls-client-ca", type=Path,
                   help="CA bundle (PEM): clients must present a certificate it signed (mutual TLS)")
    g.add_argument("--tls-reload-s", type=float,
                   help=f"check the certificate files this often and use renewed ones for new connections "
                        f"(default {default('tls_reload_s'):g}; 0: never)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Flags that were given override the config's defaults (unset flags never mask them)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "log_level"}
    if "models" in given:
        given["models"] = tuple(given["models"])
    return ServerConfig(**given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        config = config_from_args(args)
    except pydantic.ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(GatewayServer(config).run())
    except (ModelLoadError, RepositoryError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
