"""Clients of the prediction gateway (`python -m serving.server`): a library and two commands.

Library (numpy arrays and dicts in and out, never protobuf; gRPC or HTTP; sync or asyncio)::

    from clients import Client, ClientError

    with Client("localhost:50051") as client:            # "http://localhost:8080" for HTTP
        info = client.get_model("scenes")                # tasks, class names, input size
        p = client.predict("scenes", "image.png", timeout=2.0)
        p.outputs["segmentation"]                        # uint8 [H, W] class indices
        p.outputs["depth"], p.timings["inference_ms"]    # float32 [H, W] metres; server-side ms
        client.predict("scenes", "image.png", probabilities=True).probabilities  # softmax, edge probabilities

`AsyncClient` has the same methods as coroutines. Calls retry UNAVAILABLE with exponential backoff
and jitter (`RetryPolicy`) within their deadline and raise `ClientError` (``.code``: the gRPC status
name) otherwise. `TLS` holds certificate options.

Commands:

- ``python -m clients.predict IMAGE... --server HOST:PORT [--http] [--out DIR]``: a picture per
  task of each image, drawn as the task's kind says (coloured classes with a legend, a colour-mapped
  map with its range, normals; attribute scores as JSON), and the server's per-stage latencies
  (`clients.predict`).
- ``python -m clients.load --server HOST:PORT --concurrency C --duration S [--rate R] [--json]``:
  closed- or open-loop load and its latency/throughput/error report; `clients.loadgen.run_load`
  gives the same report as a dict to other programs.
"""

from clients.client import AsyncClient, Client
from clients.errors import ClientError
from clients.retry import RetryPolicy
from clients.transport import TLS
from clients.types import ModelInfo, Prediction, TaskInfo

__all__ = ["AsyncClient", "Client", "ClientError", "ModelInfo", "Prediction", "RetryPolicy", "TLS", "TaskInfo"]
