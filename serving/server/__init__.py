"""The prediction gateway: gRPC and HTTP front ends over dynamically batched model backends.

Modules, outside in: `__main__` (CLI) and `config` (settings); `lifecycle` (start, readiness,
SIGTERM drain); `grpc_service` and `http_app` (thin protocol adapters, `http_schemas` for JSON);
`service` (the protocol-neutral `Gateway`: stage timing, status counting); `codec` (decode,
preprocess, postprocess); `models` (versions, hot swap); `batcher` (dynamic batching); `backend`
(the `Backend` interface and ONNX Runtime); `metadata` (what the manifest says); `metrics`
(Prometheus); `errors` (the exception vocabulary and its gRPC/HTTP codes).
"""
