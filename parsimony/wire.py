"""The wire vocabulary the gateway, its clients and the tools share, each written once here.

- **Tensor dtypes** on the wire: little-endian, C order. The proto's ``DataType`` enum and the JSON
  API use the same names (``FLOAT32`` / ``"float32"``).
- **Timing stages** of a prediction, as the metrics label them and as responses report them
  (``<stage>_ms``).
- **Image encodings** the gateway decodes, recognised by their magic bytes.
- **Status codes**: every refusal the gateway can answer with, its gRPC status name and its HTTP
  status; the client maps HTTP statuses back to gRPC names through the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
}
OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16")  # what a caller may ask float maps in
DEFAULT_OUTPUT_DTYPE = "float32"


def proto_dtype_name(dtype: str) -> str:
    """The proto ``DataType`` enum name of a wire dtype (``"float32"`` -> ``"FLOAT32"``)."""
    if dtype not in WIRE_DTYPES:
        raise KeyError(f"{dtype!r} is not a wire dtype; the wire carries {sorted(WIRE_DTYPES)}")
    return dtype.upper()


def wire_dtype_of(array: np.ndarray) -> str:
    """The wire name of ``array``'s dtype (refused when the wire cannot carry it)."""
    for name, dtype in WIRE_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    raise TypeError(f"arrays of {array.dtype} cannot travel on the wire; it carries {sorted(WIRE_DTYPES)}")


def to_wire(array: np.ndarray) -> bytes:
    """The bytes of ``array`` as the wire carries them (little-endian, C order)."""
    dtype = WIRE_DTYPES[wire_dtype_of(array)]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_wire(dtype: str, shape, data: bytes) -> np.ndarray:
    """A tensor from its wire form; a read-only view of ``data``."""
    return np.frombuffer(data, WIRE_DTYPES[dtype]).reshape(tuple(int(n) for n in shape))


STAGES: tuple[str, ...] = ("decode", "preprocess", "queue", "inference", "postprocess", "total")
STAGE_FIELDS: tuple[str, ...] = tuple(f"{s}_ms" for s in STAGES)

ENCODINGS: tuple[str, ...] = ("png", "jpeg")
_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}


def sniff_encoding(data: bytes) -> str | None:
    """``"png"`` or ``"jpeg"`` from the first bytes of an encoded image, None for anything else."""
    return next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)


@dataclass(frozen=True)
class Status:
    """One answer the gateway can give: its own name (the exception's code), the gRPC status
    name both protocols report in bodies and metrics, and the HTTP status."""

    name: str
    grpc: str
    http: int


STATUSES: tuple[Status, ...] = (
    Status("OK", "OK", 200),
    Status("INVALID_ARGUMENT", "INVALID_ARGUMENT", 400),
    Status("PAYLOAD_TOO_LARGE", "INVALID_ARGUMENT", 413),  # HTTP only: a body over the size limit
    Status("UNSUPPORTED_MEDIA", "INVALID_ARGUMENT", 415),  # HTTP only: a body type the gateway cannot read
    Status("VALIDATION_FAILED", "INVALID_ARGUMENT", 422),  # HTTP only: a JSON body of the wrong shape
    Status("NOT_FOUND", "NOT_FOUND", 404),
    Status("RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", 429),
    Status("CANCELLED", "CANCELLED", 499),  # the client went away (nginx's 499)
    Status("INTERNAL", "INTERNAL", 500),
    Status("UNAVAILABLE", "UNAVAILABLE", 503),
    Status("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", 504),
)
STATUS = {s.name: s for s in STATUSES}

# HTTP statuses proxies and load balancers in front of the gateway answer with, as gRPC names
_PROXY_STATUSES = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE"}
HTTP_TO_GRPC: dict[int, str] = {s.http: s.grpc for s in STATUSES if s.name != "OK"} | _PROXY_STATUSES

# gRPC codes that mean the server failed, not the caller: the only ones the error-ratio alert counts
SERVER_FAULT_CODES: tuple[str, ...] = ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN")


def grpc_name_for_http(status: int) -> str:
    """The gRPC status name of an HTTP error status (``"UNKNOWN"`` for one nothing maps)."""
    return HTTP_TO_GRPC.get(status, "UNKNOWN")
