"""HTTP front end (FastAPI): the gRPC API's operations plus health, readiness, metrics and OpenAPI.

| route                              | what                                                        |
|------------------------------------|-------------------------------------------------------------|
| ``POST /v1/models/{name}:predict`` | body: raw ``image/png`` or ``image/jpeg``, ``multipart/form-data`` (file field ``image``), or JSON (`PredictJSON`) |
| ``GET /v1/models``                 | the served models                                           |
| ``GET /v1/models/{name}``          | one model: tasks, class and attribute names, input size     |
| ``GET /healthz``                   | liveness: 200 while the process serves HTTP                 |
| ``GET /readyz``                    | readiness: 200 once every model is loaded and warmed up, 503 while loading or draining |
| ``GET /metrics``                   | Prometheus exposition                                       |
| ``GET /openapi.json``              | the OpenAPI schema                                          |
| ``GET /docs``                      | its browsable page (Swagger UI, loaded from a CDN): only with ``--docs`` |

Prediction options: query parameters ``tasks`` (comma-separated or repeated), ``output_dtype``
(``float32``/``float16``) and ``probabilities`` (``true``/``false``: the probability maps of every
task whose kind has them; ``segmentation_probabilities`` is its older spelling, still honoured) work
with every body type; multipart form fields and JSON keys of the same names take precedence. A deadline can be
given in milliseconds with the ``X-Timeout-Ms`` header (a positive number); it is capped at
``--max-deadline-s``, which is also the deadline of a request without the header, and a response
whose deadline was capped says so in ``X-Deadline-Capped-Ms`` (the time allowed). Errors are
``{"error": {"code", "message"}}`` with the HTTP status of `serving.server.errors.Code`; a request
refused because the server is draining also carries ``Retry-After``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable

import pydantic
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from parsimony.tasks import kind, kind_names
from parsimony.wire import OUTPUT_DTYPES, to_wire, wire_dtype_of
from serving.server import codec
from serving.server.errors import (
    Code,
    GatewayError,
    InvalidInput,
    ShuttingDown,
    UnsupportedMediaType,
    answered_codes,
    as_gateway_error,
    shown,
)
from serving.server.http_schemas import (
    PROBABILITIES,
    ErrorJSON,
    ListModelsJSON,
    ModelInfoJSON,
    PredictJSON,
    PredictResponseJSON,
)
from serving.server.metrics import CONTENT_TYPE
from serving.server.service import Deadline, Gateway, PredictCall, Prediction, describe_model

CAPPED_HEADER = "X-Deadline-Capped-Ms"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream")
_ERRORS = {code.http: {"model": ErrorJSON, "description": code.name} for code in answered_codes()}
_PREDICT_BODY = {
    "required": True,
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"},
            "tasks": {"type": "string", "description": "comma-separated task names"},
            "output_dtype": {"type": "string", "enum": list(OUTPUT_DTYPES)},
            "probabilities": {"type": "boolean", "description": PROBABILITIES},
            "segmentation_probabilities": {"type": "boolean", "description": "the older spelling of probabilities"}}}},
        "application/json": {"schema": {"$ref": "#/components/schemas/PredictJSON"}},
    },
}


def create_app(gateway: Gateway, readiness: Callable[[], tuple[bool, dict]], *, docs: bool = False) -> FastAPI:
    """The app; ``readiness()`` returns (ready, details) for ``/readyz``; ``docs``: serve ``/docs``."""
    app = FastAPI(title="parsimony prediction gateway", version="v1", docs_url="/docs" if docs else None,
                  redoc_url=None,
                  description=f"Multi-task predictions ({', '.join(kind_names())}) from one forward pass.")

    @app.post("/v1/models/{name}:predict", response_model=PredictResponseJSON, responses=_ERRORS,
              openapi_extra={"requestBody": _PREDICT_BODY}, summary="Predict every (or the requested) task")
    async def predict(name: str, request: Request) -> Response:
        with gateway.track("http", "Predict") as tracked:
            tracked.model = name
            call = await _parse_predict(request, name, gateway)
            return _json(prediction_to_json(await gateway.predict(call)), request)

    @app.get("/v1/models", response_model=ListModelsJSON, summary="The served models")
    async def list_models() -> Response:
        with gateway.track("http", "ListModels"):
            return _json({"models": [describe_model(m) for m in gateway.list_models()]})

    @app.get("/v1/models/{name}", response_model=ModelInfoJSON, responses=_ERRORS, summary="One model")
    async def get_model(name: str) -> Response:
        with gateway.track("http", "GetModel") as tracked:
            tracked.model = name
            return _json(describe_model(gateway.get_model(name)))

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: models loaded and warmed up, not draining")
    async def readyz() -> Response:
        ready, details = readiness()
        return JSONResponse(details, status_code=200 if ready else Code.UNAVAILABLE.http)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc, request)

    app.openapi = _with_request_schema(app.openapi)
    return app


def _with_request_schema(generate: Callable[[], dict]) -> Callable[[], dict]:
    """Add `PredictJSON` (which the predict route parses itself) to the schema's components."""

    def openapi() -> dict:
        schema = generate()  # FastAPI caches the dict it returns: amend it once
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "PredictJSON" not in components:
            extra = PredictJSON.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in extra.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["PredictJSON"] = extra
        return schema

    return openapi


def error_response(exc: BaseException, request: Request | None = None) -> Response:
    error = as_gateway_error(exc)
    response = JSONResponse({"error": {"code": error.code.name, "message": str(error)}},
                            status_code=error.code.http)
    if isinstance(error, ShuttingDown):
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return _mark_capped(response, request)


def _json(body: dict, request: Request | None = None) -> Response:
    return _mark_capped(Response(json.dumps(body, separators=(",", ":")), media_type="application/json"), request)


def _mark_capped(response: Response, request: Request | None) -> Response:
    capped = None if request is None else getattr(request.state, "deadline_capped_ms", None)
    if capped is not None:
        response.headers[CAPPED_HEADER] = str(capped)
    return response


# --- requests -----------------------------------------------------------------------------------


async def _parse_predict(request: Request, name: str, gateway: Gateway) -> PredictCall:
    body = await _read_body(request, gateway)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options = _query_options(request)
    deadline = _deadline(request, gateway)
    if media in IMAGE_TYPES:
        return PredictCall(model=name, encoded=body, deadline=deadline, **options)
    if media == "multipart/form-data":
        encoded, form_options = await _parse_multipart(request, body)
        return PredictCall(model=name, encoded=encoded, deadline=deadline, **{**options, **form_options})
    if media == "application/json":
        return _parse_json(body, name, deadline)
    raise UnsupportedMediaType(
        f"Content-Type {media or '(none)'!r} is not accepted; send image/png, image/jpeg, multipart/form-data "
        f"(file field 'image') or application/json"
    )


async def _read_body(request: Request, gateway: Gateway) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        gateway.check_message_size(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        gateway.check_message_size(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _deadline(request: Request, gateway: Gateway) -> float:
    """The request's deadline from ``X-Timeout-Ms`` (a positive number of milliseconds), capped."""
    value = request.headers.get("x-timeout-ms")
    ms = None
    if value is not None:
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms > 0):
            raise InvalidInput(f"X-Timeout-Ms must be a positive number of milliseconds, got {shown(value)}; "
                               f"leave the header out to get the server's longest deadline")
    deadline: Deadline = gateway.deadline(None if ms is None else ms / 1e3)
    request.state.deadline_capped_ms = deadline.capped_ms
    return deadline.at


PROBABILITY_FLAGS = ("probabilities", "segmentation_probabilities")  # the flag and its older spelling


def _options(tasks: list[str], output_dtype: str | None, flags: dict[str, str | None]) -> dict:
    """Prediction options from text fields (a query string or a form); ``flags`` maps each name of
    `PROBABILITY_FLAGS` to its value, None where not given."""
    options: dict = {}
    names = tuple(n.strip() for item in tasks for n in item.split(",") if n.strip())
    if names:
        options["tasks"] = names
    if output_dtype is not None:
        options["output_dtype"] = output_dtype
    given = [_flag(name, value) for name, value in flags.items() if value is not None]
    if given:
        options["probabilities"] = any(given)
    return options


def _flag(name: str, value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise InvalidInput(f"{name} must be true or false, got {shown(value)}")
    return value.lower() in ("true", "1")


def _query_options(request: Request) -> dict:
    q = request.query_params
    return _options(q.getlist("tasks"), q.get("output_dtype"), {f: q.get(f) for f in PROBABILITY_FLAGS})


async def _parse_multipart(request: Request, body: bytes) -> tuple[bytes, dict]:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise InvalidInput(f"the multipart body cannot be parsed ({exc.message})") from exc
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise InvalidInput(f"the multipart body has no file field 'image' (fields: {sorted(form.keys())})")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    options = _options(form.getlist("tasks"), fields.get("output_dtype"), {f: fields.get(f) for f in PROBABILITY_FLAGS})
    return await image.read(), options


def _parse_json(body: bytes, name: str, deadline: float | None) -> PredictCall:
    try:
        req = PredictJSON.model_validate_json(body)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"the JSON request is invalid: {problems}") from None
    tensor = None
    if req.tensor is not None:
        tensor = codec.RawTensor(req.tensor.dtype, tuple(req.tensor.shape), _b64(req.tensor.data, "tensor.data"))
    return PredictCall(model=name, encoded=None if req.image is None else _b64(req.image, "image"), tensor=tensor,
                       tasks=tuple(req.tasks), output_dtype=req.output_dtype,
                       probabilities=req.probabilities or req.segmentation_probabilities, deadline=deadline)


def _b64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{field} is not valid base64 ({exc})") from None


# --- responses ----------------------------------------------------------------------------------


def _tensor(array) -> dict:
    return {"dtype": wire_dtype_of(array), "shape": list(array.shape), "data": base64.b64encode(to_wire(array)).decode()}


def _task_json(result: codec.TaskResult) -> dict:
    """``{"kind": ..., field: tensor or map, ...}``: every field of the kind, optional ones null when not asked for."""
    owner = kind(result.kind)
    out: dict = {"kind": result.kind, **dict.fromkeys(owner.optional_fields)}
    for name, value in result.fields.items():
        out[name] = value if owner.field(name).what == "map" else _tensor(value)
    return out


def prediction_to_json(p: Prediction) -> dict:
    return {
        "model": p.model,
        "model_version": p.version,
        "outputs": {name: _task_json(result) for name, result in p.outputs.items()},
        "timings": {**p.timings.milliseconds(), "batch_size": p.timings.batch_size},
    }
