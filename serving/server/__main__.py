"""`python -m serving.server`: the prediction gateway (gRPC + HTTP) for multi-task models.

    python -m serving.server --repository model_repository --model scenes
    python -m serving.server --run runs/demo                       # an exported run, served as version 1
    python -m serving.server --repository model_repository --model scenes \
        --backend triton --triton-url triton:8001                   # Triton runs the forward passes
    python -m serving.server --repository model_repository --model scenes \\
        --grpc-port 50051 --http-port 8080 --max-batch 16 --max-queue-delay-ms 2 --threads 2

Serves ``parsimony.v1.PredictionService`` (serving/proto/parsimony/v1/gateway.proto) over gRPC with
the standard health service and reflection, and the same operations over HTTP
(``POST /v1/models/NAME:predict``, ``GET /v1/models[/NAME]``, ``/healthz``, ``/readyz``,
``/metrics``, ``/docs``). Models run in ONNX Runtime inside this process with dynamic batching, or,
with ``--backend triton --triton-url HOST:PORT``, on a Triton server that serves the same repository
(the gateway still reads each version's manifest.json from it: mount the repository in both).
New versions appearing in the repository are loaded and swapped in without failing requests.
SIGTERM drains in-flight requests (up to --grace-period-s) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import pydantic

from serving.repository import RepositoryError
from serving.server.backend import SPINNING
from serving.server.config import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, ServerConfig
from serving.server.errors import ModelLoadError
from serving.server.lifecycle import GatewayServer

log = logging.getLogger("serving.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--repository", type=Path, help="model repository (REPO/NAME/<version>/model.onnx)")
    source.add_argument("--run", type=Path, help="an exported run directory (model.onnx + manifest.json)")
    p.add_argument("--model", dest="models", action="append", metavar="NAME",
                   help="model to serve (repeatable; default: every model in the repository; with --run: its name)")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, help=f"gRPC port (default {DEFAULT_GRPC_PORT}; 0 picks a free one)")
    p.add_argument("--http-port", type=int, help=f"HTTP port (default {DEFAULT_HTTP_PORT}; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, help="largest dynamic batch (default 16)")
    p.add_argument("--max-queue-delay-ms", type=float,
                   help="hold a batch's first request up to this long for the batch to fill (default 0: never wait)")
    p.add_argument("--max-queue", type=int, help="queued requests per model before RESOURCE_EXHAUSTED/429 (default 128)")
    p.add_argument("--backend", choices=["onnxruntime", "triton"],
                   help="onnxruntime: run models in this process (default); triton: send batches to --triton-url")
    p.add_argument("--triton-url", metavar="HOST:PORT",
                   help="Triton's gRPC endpoint (--backend triton); Triton must serve the same repository")
    p.add_argument("--triton-concurrency", type=int, help="batches in flight to Triton at once (default 4)")
    p.add_argument("--triton-load-timeout-s", type=float,
                   help="longest wait for Triton to report a model (version) ready (default 300)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default 0: one per physical core)")
    p.add_argument("--ort-spinning", choices=list(SPINNING),
                   help="when ONNX Runtime's intra-op threads busy-wait for work: during a forward pass only (default: "
                        "fast hand-offs between ops, idle cores between requests), always (also between forward "
                        "passes, taking the cores the event loop needs), never")
    p.add_argument("--max-message-bytes", type=int, help="largest request accepted (default 8 MiB)")
    p.add_argument("--max-image-pixels", type=int, help="largest image accepted, in pixels (default 4096*4096)")
    p.add_argument("--poll-interval-s", type=float, help="repository poll period for new versions (default 2; 0: off)")
    p.add_argument("--grace-period-s", type=float, help="SIGTERM: longest wait for in-flight requests (default 30)")
    p.add_argument("--drain-delay-s", type=float,
                   help="SIGTERM: report not-ready this long before closing the ports (default 0)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


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
    except (ModelLoadError, RepositoryError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
