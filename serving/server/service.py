"""The protocol-neutral gateway: Predict, ListModels and GetModel on domain types, instrumented once.

The gRPC servicer and the HTTP app are thin: each converts its request into a `PredictCall`,
calls `Gateway`, and converts the `Prediction` (or the `GatewayError`) back. Everything that must
behave identically on both protocols lives here: stage timing (`predict` times decode,
preprocess, queue, inference, postprocess and total into the stage histograms), status counting
and the in-flight gauge (`Gateway.track`, entered around the whole handler so that errors raised
while parsing a request are counted too), and the mapping of stray exceptions to INTERNAL.

A prediction asks the backend only for the tensors its tasks need (`ModelMetadata.outputs_for`): from
a final graph the requested tasks' answers, in the requested dtype, probability maps only when asked
for, passed through to the response untouched; from a raw graph the tasks' head outputs, which their
kinds post-process here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from parsimony.wire import DEFAULT_OUTPUT_DTYPE, ENCODINGS, STAGES
from serving.server import codec
from serving.server.config import default
from serving.server.errors import (
    BackendUnavailable,
    Code,
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    MessageTooLarge,
    ShuttingDown,
    as_gateway_error,
)
from serving.server.metrics import GatewayMetrics
from serving.server.models import ModelManager, ServedModel


@dataclass(frozen=True, slots=True)
class PredictCall:
    """One prediction request, whichever protocol carried it. Exactly one of ``encoded``/``tensor``."""

    model: str
    encoded: bytes | None = None
    tensor: codec.RawTensor | None = None
    tasks: tuple[str, ...] = ()
    output_dtype: str = DEFAULT_OUTPUT_DTYPE
    probabilities: bool = False  # the probability maps of every task whose kind has them
    deadline: float | None = None  # time.perf_counter() by which the caller wants the answer


@dataclass(frozen=True, slots=True)
class Timings:
    """Server-side seconds per stage (`parsimony.wire.STAGES`, in that order), summing to ``total``.
    ``inference`` is the forward pass of the whole batch; ``postprocess`` runs from its end to this
    request's answer, so it includes the post-processing of the requests of the same batch that were
    answered first."""

    decode: float
    preprocess: float
    queue: float
    inference: float
    postprocess: float
    total: float
    batch_size: int

    def milliseconds(self) -> dict[str, float]:
        """``{"decode_ms": ..., "total_ms": ...}``: the stages as both protocols report them."""
        return {f"{stage}_ms": getattr(self, stage) * 1e3 for stage in STAGES}


@dataclass(frozen=True, slots=True)
class Prediction:
    model: str
    version: int
    outputs: dict[str, codec.TaskResult]
    timings: Timings


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = default("max_message_bytes")
    max_image_pixels: int = default("max_image_pixels")
    max_deadline_s: float = default("max_deadline_s")


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must be answered (a ``time.perf_counter()`` value), and whether the server's
    ``--max-deadline-s`` shortened (or set) it; ``capped_ms`` is then the time allowed, for the response
    metadata (``x-deadline-capped-ms``)."""

    at: float
    capped_ms: int | None = None


class Gateway:
    def __init__(self, models: ModelManager, metrics: GatewayMetrics, limits: Limits = Limits()) -> None:
        self.models = models
        self.metrics = metrics
        self.limits = limits
        self.accepting = True  # False from the moment the server drains: new calls get UNAVAILABLE

    def track(self, protocol: str, method: str) -> _Tracked:
        """``with gateway.track("grpc", "Predict") as t:`` counts the call by status code, keeps the
        in-flight gauge, and turns any exception into a `GatewayError` (set ``t.model`` once known)."""
        return _Tracked(self, protocol, method)

    def admit(self) -> None:
        """Refuse a new call while draining: it never ran, so the client can retry it elsewhere."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down and takes no new calls; retry: another replica (or "
                               "this one once restarted) will answer")

    def deadline(self, remaining_s: float | None) -> Deadline:
        """The deadline of a call that the caller wants answered within ``remaining_s`` (None: no limit),
        capped at the server's maximum."""
        now, longest = time.perf_counter(), self.limits.max_deadline_s
        if remaining_s is None or remaining_s > longest:
            return Deadline(now + longest, round(longest * 1e3))
        return Deadline(now + remaining_s)

    def check_message_size(self, size: int) -> None:
        if size > self.limits.max_message_bytes:
            raise MessageTooLarge(
                f"the request is {size} bytes, over the server's limit of {self.limits.max_message_bytes} "
                f"(--max-message-bytes); send a smaller image (the model's input size is enough)"
            )

    async def predict(self, call: PredictCall) -> Prediction:
        self.admit()
        started = time.perf_counter()
        with self.models.lease(call.model) as model:
            return await self._predict(model, call, started)

    async def _predict(self, model: ServedModel, call: PredictCall, started: float) -> Prediction:
        meta = model.metadata
        if not model.backend.ready:
            raise BackendUnavailable(f"model {meta.name!r} cannot run requests now ({model.backend.not_ready_reason}); "
                                     f"retry with backoff (GET /readyz says when it is back)")
        tasks = codec.select_tasks(meta, call.tasks)
        dtype = codec.output_dtype(call.output_dtype)
        if call.encoded is not None:
            image = codec.decode_image(call.encoded, meta, self.limits.max_image_pixels)
            decoded = time.perf_counter()
            x = codec.model_input(image, meta)
        elif call.tensor is not None:
            decoded = started
            x = codec.tensor_input(call.tensor, meta, self.limits.max_image_pixels)
        else:
            raise InvalidInput("the request has no image: send encoded PNG/JPEG bytes or a raw tensor")
        preprocessed = time.perf_counter()
        if call.deadline is not None and call.deadline <= preprocessed:
            raise DeadlineExceeded("the request's deadline passed before it reached the model queue")
        wanted = [meta.outputs_for(t, call.output_dtype, call.probabilities) for t in tasks]
        result = await model.batcher.submit(x, [name for fields in wanted for _, name in fields], call.deadline)
        got = result.outputs
        if meta.final:  # the graph's answers, passed through
            outputs = {t.name: codec.final_result(t, {field: got[name] for field, name in fields})
                       for t, fields in zip(tasks, wanted, strict=True)}
        else:
            outputs = {t.name: codec.postprocess(t, got[fields[0][1]], dtype, call.probabilities)
                       for t, fields in zip(tasks, wanted, strict=True)}
        done = time.perf_counter()
        queue, inference = result.queue_s, result.inference_s
        timings = Timings(decoded - started, preprocessed - decoded, queue, inference,
                          done - preprocessed - queue - inference, done - started, result.batch_size)
        self.metrics.observe_stages(meta.name, [getattr(timings, stage) for stage in STAGES])
        return Prediction(meta.name, meta.version, outputs, timings)

    def list_models(self) -> list[ServedModel]:
        self.admit()
        return self.models.served()

    def get_model(self, name: str) -> ServedModel:
        self.admit()
        return self.models.lease(name)


def describe_model(model: ServedModel) -> dict:
    """A served version as both protocols describe it (the fields of ``parsimony.v1.ModelInfo``)."""
    meta = model.metadata
    return {
        "name": meta.name,
        "version": meta.version,
        "ready": model.backend.ready,
        "backend": model.backend.kind,
        "input": {"height": meta.height, "width": meta.width, "channels": meta.channels, "color": "RGB",
                  "encodings": list(ENCODINGS)},
        "tasks": [{"name": t.name, "kind": t.kind, "channels": t.channels, "class_names": list(t.class_names),
                   "attribute_names": list(t.attribute_names), "unit": t.unit, "semantics": t.semantics}
                  for t in meta.tasks],
        "max_batch_size": model.batcher.max_batch,
        "parameters": meta.parameters,
        "macs": meta.macs,
    }


class _Tracked:
    __slots__ = ("gateway", "protocol", "method", "model", "error")

    def __init__(self, gateway: Gateway, protocol: str, method: str) -> None:
        self.gateway, self.protocol, self.method = gateway, protocol, method
        self.model = ""
        self.error: GatewayError | None = None

    def __enter__(self) -> _Tracked:
        self.gateway.metrics.in_flight_for(self.protocol).inc()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        metrics = self.gateway.metrics
        metrics.in_flight_for(self.protocol).dec()
        if exc is None:
            code = Code.OK
        elif isinstance(exc, asyncio.CancelledError):  # the client went away: let the cancellation unwind
            code = Code.CANCELLED
        else:
            self.error = as_gateway_error(exc)
            code = self.error.code
        model = self.model if self.model in self.gateway.models.names else ""
        metrics.count(self.protocol, self.method, model, code.grpc_name)
        if self.error is not None and self.error is not exc:
            raise self.error from exc
        return False
