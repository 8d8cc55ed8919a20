"""Prometheus metrics of the gateway, all in one registry per server (``GET /metrics``).

| metric                                        | type      | labels                          |
|-----------------------------------------------|-----------|---------------------------------|
| parsimony_gateway_stage_seconds               | histogram | model, stage                    |
| parsimony_gateway_requests_total              | counter   | protocol, method, model, code   |
| parsimony_gateway_errors_total                | counter   | protocol, method, model, code   |
| parsimony_gateway_batch_size                  | histogram | model                           |
| parsimony_gateway_in_flight_requests          | gauge     | protocol                        |
| parsimony_gateway_queue_depth                 | gauge     | model                           |
| parsimony_gateway_model_info                  | gauge (1) | model, version, backend, tasks, input_size |
| parsimony_gateway_model_loads_total           | counter   | model, outcome                  |
| parsimony_gateway_backend_ready               | gauge     | model                           |

Stages of a successful prediction (`parsimony.wire.STAGES`): decode, preprocess, queue, inference,
postprocess, total. Latencies are histograms (not summaries) so that quantiles can be aggregated
across replicas in Prometheus: ``histogram_quantile(0.99, sum by (le) (rate(
parsimony_gateway_stage_seconds_bucket{stage="total"}[5m])))``. ``code`` is a gRPC status name, for
both protocols: HTTP-only refusals count as their gRPC equivalent (413 payload too large and 415
unsupported media as INVALID_ARGUMENT, see `serving.server.errors`), so one query covers both and
the server-side codes (`parsimony.wire.SERVER_FAULT_CODES`) are told from the callers' mistakes by
name alone. A model label only ever holds a served model's name (unknown names count as ``""``),
so clients cannot blow up the label cardinality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from parsimony.wire import STAGES

LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series: they double the exposition and nothing here reads them


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram("parsimony_gateway_stage_seconds",
                                       "Server-side latency of successful predictions by stage",
                                       ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("parsimony_gateway_requests", "Requests by protocol, method, model and status code",
                                ["protocol", "method", "model", "code"], registry=r)
        self.errors = Counter("parsimony_gateway_errors", "Failed requests by protocol, method, model and status code",
                              ["protocol", "method", "model", "code"], registry=r)
        self.batch_size = Histogram("parsimony_gateway_batch_size", "Images per forward pass", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("parsimony_gateway_in_flight_requests", "Requests being handled", ["protocol"],
                               registry=r)
        self.queue_depth = Gauge("parsimony_gateway_queue_depth", "Requests waiting for a batch", ["model"],
                                 registry=r)
        self.model_info = Gauge("parsimony_gateway_model_info", "The served model version (value 1)",
                                ["model", "version", "backend", "tasks", "input_size"], registry=r)
        self.backend_ready = Gauge("parsimony_gateway_backend_ready",
                                   "1 while the model's backend can run requests (0: e.g. Triton unreachable)",
                                   ["model"], registry=r)
        self.model_loads = Counter("parsimony_gateway_model_loads", "Model version loads by outcome",
                                   ["model", "outcome"], registry=r)
        # label lookups cost a lock and a dict build each: the hot path reuses the children
        self._stage_children: dict[str, list] = {}
        self._counters: dict[tuple[str, ...], list] = {}
        self._in_flight: dict[str, Gauge] = {}
        self._info_labels: dict[str, tuple[str, ...]] = {}

    def observe_stages(self, model: str, seconds: Sequence[float]) -> None:
        """Record one prediction's stage latencies, in `STAGES` order."""
        children = self._stage_children.get(model)
        if children is None:
            children = self._stage_children[model] = [self.stage_seconds.labels(model, s) for s in STAGES]
        for child, value in zip(children, seconds, strict=True):
            child.observe(value)

    def count(self, protocol: str, method: str, model: str, code: str) -> None:
        key = (protocol, method, model, code)
        counters = self._counters.get(key)
        if counters is None:
            counters = self._counters[key] = [self.requests.labels(*key)] + (
                [self.errors.labels(*key)] if code != "OK" else [])
        for counter in counters:
            counter.inc()

    def in_flight_for(self, protocol: str) -> Gauge:
        gauge = self._in_flight.get(protocol)
        if gauge is None:
            gauge = self._in_flight[protocol] = self.in_flight.labels(protocol)
        return gauge

    def batch_observer(self, model: str) -> Callable[[int], None]:
        return self.batch_size.labels(model).observe

    def model_loaded(self, model: str, version: int, backend: str, tasks: Sequence[str], input_size: tuple[int, int],
                     queue_depth: Callable[[], float], backend_ready: Callable[[], float]) -> None:
        """Mark ``version`` as the served one (replacing the previous version's info series)."""
        old = self._info_labels.pop(model, None)
        if old is not None:
            self.model_info.remove(*old)
        labels = (model, str(version), backend, ",".join(tasks), f"{input_size[0]}x{input_size[1]}")
        self.model_info.labels(*labels).set(1)
        self._info_labels[model] = labels
        self.queue_depth.labels(model).set_function(queue_depth)
        self.backend_ready.labels(model).set_function(backend_ready)
        self.model_loads.labels(model, "success").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
