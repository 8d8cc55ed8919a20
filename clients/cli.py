"""What both commands share: where the server is and how to reach it, which model, which image."""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clients.client import DEFAULT_RETRY, DEFAULT_TIMEOUT
from clients.errors import ClientError
from clients.retry import RetryPolicy
from clients.transport import TLS
from clients.types import ModelInfo

log = logging.getLogger("clients")


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--server", required=True,
                       help="HOST:PORT (gRPC by default), or grpc://, grpcs://, http://, https:// URLs")
    group.add_argument("--http", action="store_true", help="use the HTTP API (HOST:PORT is the HTTP port)")
    group.add_argument("--model", help="model name (default: the only model the server serves)")
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                       help="deadline per call in seconds (default %(default)s)")
    group.add_argument("--retries", type=int, default=DEFAULT_RETRY.max_attempts - 1,
                       help="retries on UNAVAILABLE, with exponential backoff (default %(default)s)")
    group.add_argument("--tls", action="store_true", help="TLS with the system's trusted roots")
    group.add_argument("--ca", help="PEM of trusted root certificates (implies TLS)")
    group.add_argument("--cert", help="client certificate PEM, for mutual TLS (with --key)")
    group.add_argument("--key", help="client private key PEM, for mutual TLS (with --cert)")


def connection_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for `Client`/`AsyncClient`; a bad combination raises ValueError."""
    if args.retries < 0:
        raise ValueError(f"--retries must be 0 or more, got {args.retries}")
    tls = TLS(args.ca, args.cert, args.key) if (args.tls or args.ca or args.cert or args.key) else None
    return {"protocol": "http" if args.http else None, "tls": tls, "timeout": args.timeout,
            "retry": RetryPolicy(max_attempts=args.retries + 1)}


def choose_model(models: list[ModelInfo], name: str | None) -> ModelInfo:
    """The named model, or the server's only one; anything else is an error naming the served models."""
    names = [m.name for m in models]
    if name:
        if name not in names:
            raise ClientError("NOT_FOUND", f"the server does not serve model {name!r}; it serves {names}")
        return models[names.index(name)]
    if len(models) != 1:
        raise ClientError("INVALID_ARGUMENT", f"the server serves {len(models)} models ({names}); choose one with --model")
    return models[0]


def load_image(path: Path, info: ModelInfo, resize: bool) -> bytes | np.ndarray:
    """The file's bytes when the server can take them as they are (PNG/JPEG RGB of the model's size),
    else its pixels, resized to the model's input (bilinear, aspect ratio not kept) when ``resize``."""
    data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read") from None
    want = (info.width, info.height)
    if image.size != want and not resize:
        raise ValueError(f"{path} is {image.size[0]}x{image.size[1]} but model {info.name!r} takes exactly "
                         f"{want[0]}x{want[1]} (width x height); resize it, or pass --resize to resize it here")
    if image.size == want and image.format in ("PNG", "JPEG") and image.mode == "RGB":
        return data
    image = image.convert("RGB")
    if image.size != want:
        log.info("%s: resized from %dx%d to %dx%d", path, *image.size, *want)
        image = image.resize(want, Image.Resampling.BILINEAR)
    return np.asarray(image)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
