"""Helpers for the gateway tests: repositories from exported runs, a real server on a background event
loop, encoded test images, free ports, a deliberately slow backend for timing-dependent cases, and a
hand-built export of any dense task kinds (`hand_built_export`) that needs no training.

`RunningGateway` starts the full `GatewayServer` (gRPC and HTTP on real loopback sockets) in this
process on its own event loop thread, so tests use ordinary blocking clients (grpc stubs, httpx)
and can still run coroutines on the server's loop (``gw.call(...)``), e.g. in-process ASGI calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import shutil
import socket
import threading
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image

from parsimony.layout import export_files
from parsimony.manifest import Manifest, sha256_file
from parsimony.spec import DTYPES
from parsimony.tasks import RAW, TaskSpec, final_io_spec, kind, model_io_spec
from parsimony.tasks.edges import EDGE
from parsimony.wire import from_wire
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.proto.parsimony.v1 import gateway_pb2_grpc as pb_grpc
from serving.server.backend import BACKENDS, OnnxRuntimeBackend, register_backend
from serving.server.config import ServerConfig
from serving.server.lifecycle import GatewayServer

RUN_FILES = ("model.onnx", "manifest.json")
EVERY_KIND = (  # one task of each kind, named by its kind, for hand-built models
    TaskSpec("segmentation", "segmentation", 4, ("floor", "wall", "bed", "sky")), TaskSpec("depth", "depth", 1),
    TaskSpec("normal", "normal", 3), TaskSpec("attributes", "attributes", 2, ("Male", "Smiling")),
    TaskSpec("edges", "edges", 1))


def publish_version(repo: Path, name: str, run_dir: Path, version: int, *, corrupt: bool = False) -> Path:
    """Copy an exported run into ``repo/name/version`` atomically (staged, then renamed), as the converter does."""
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{version}"
    staging.mkdir()
    for file in RUN_FILES:
        shutil.copy2(Path(run_dir) / file, staging / file)
    if corrupt:
        (staging / "model.onnx").write_bytes(b"not an onnx graph")
    os.rename(staging, model_dir / str(version))
    return model_dir / str(version)


def image_bytes(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB", seed: int = 0) -> bytes:
    """An encoded random image of ``size`` (H, W)."""
    h, w = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensor_of(message: pb.Tensor) -> np.ndarray:
    return from_wire(pb.DataType.Name(message.dtype).lower(), message.shape, message.data)


def answers(response: pb.PredictResponse) -> dict[str, dict[str, np.ndarray | dict]]:
    """``{task: {field: value}}`` of every field a response sets, read through each task's kind."""
    found = {}
    for task, out in response.outputs.items():
        name = out.WhichOneof("output")
        message = getattr(out, name)
        found[task] = {f.name: dict(getattr(message, f.name)) if f.what == "map" else tensor_of(getattr(message, f.name))
                       for f in kind(name).fields if f.what == "map" or message.HasField(f.name)}
    return found


def hand_built_export(folder: Path, tasks: tuple[TaskSpec, ...], size: tuple[int, int] = (32, 48),
                      seed: int = 0, *, final: bool = False, input_dtype: str = "uint8") -> Path:
    """``model.onnx`` and ``manifest.json`` of a model with ``tasks``, built by hand: each dense task's
    head is a 1x1 convolution of the image with random weights (so every output depends on its image,
    with both signs), an attributes head the same of the image's mean colour; named and shaped by the
    contract's tensor spec, described by a manifest from the kinds' own sections. Serves any kind end
    to end before a trained model of it exists.

    ``final``: a final graph (`parsimony.tasks.final_io_spec`): the image input in ``input_dtype``
    (uint8 ``[N, H, W, 3]`` pixels, converted to [0, 1] inside, or float32 ``[N, 3, H, W]``) and every
    field of every task's answer in every dtype it is offered in, computed in the graph as the kinds'
    reference post-processing does, plus the raw head outputs (``TASK_raw``); the manifest's ``graph``
    section says which output holds what. Otherwise a raw graph, as every export before final graphs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if final:
        spec, graph_outputs = final_io_spec(tasks, size, input_dtype=input_dtype)
    else:
        spec, graph_outputs = model_io_spec(tasks, size), ()
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    pixels = "image"
    if final and input_dtype == "uint8":  # uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [0, 1]
        weights.append(numpy_helper.from_array(np.array(255, np.float32), "scale"))
        nodes += [helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
                  helper.make_node("Div", ["image_f", "scale"], ["image_unit"]),
                  helper.make_node("Transpose", ["image_unit"], ["pixels"], perm=[0, 3, 1, 2])]
        pixels = "pixels"
    for task in tasks:
        w = rng.standard_normal((task.channels, 3, 1, 1)).astype(np.float32) * 4
        b = rng.standard_normal(task.channels).astype(np.float32) - 2 * w.sum(axis=(1, 2, 3)) / 4
        weights += [numpy_helper.from_array(w, f"{task.name}_w"), numpy_helper.from_array(b, f"{task.name}_b")]
        head = f"{task.name}_logits" if final else task.name
        if kind(task.kind).dense:
            nodes.append(helper.make_node("Conv", [pixels, f"{task.name}_w", f"{task.name}_b"], [head]))
        else:  # [N, A] from the mean colour
            nodes += [helper.make_node("GlobalAveragePool", [pixels], [f"{task.name}_mean"]),
                      helper.make_node("Conv", [f"{task.name}_mean", f"{task.name}_w", f"{task.name}_b"],
                                       [f"{task.name}_head"]),
                      helper.make_node("Flatten", [f"{task.name}_head"], [head], axis=1)]
    if final:
        weights += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0), ("edge", EDGE))]
        weights.append(numpy_helper.from_array(np.array([1], np.int64), "channel_axis"))
        fields = {}
        for task in tasks:
            fields.update(_final_fields(helper, task, f"{task.name}_logits", nodes))
        for out in graph_outputs:
            source = f"{out.task}_logits" if out.field == RAW else fields[(out.task, out.field)]
            nodes.append(helper.make_node("Cast", [source], [out.name], to=DTYPES[out.dtype].onnx))

    def value(tensor):
        return helper.make_tensor_value_info(tensor.name, tensor.element_type.onnx,
                                             ["batch" if d == -1 else d for d in tensor.shape])

    graph = helper.make_graph(nodes, "hand_built", [value(t) for t in spec.inputs], [value(t) for t in spec.outputs],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, manifest_path = export_files(folder)
    onnx.save(model, onnx_path)
    spec.check_against_onnx(onnx_path)
    manifest = {
        "format_version": 1, "model_name": "hand-built", "onnx_sha256": sha256_file(onnx_path),
        "input": {"size": list(size)}, "io_spec": spec.to_dict(), "model_config": {}, "export": {},
        "tasks": [kind(t.kind).manifest_section(t.info()) for t in tasks],
        "complexity": {"parameters": sum(numpy_helper.to_array(w).size for w in weights), "macs": 0},
    }
    if final:
        manifest["input"] |= {"dtype": input_dtype, "layout": "NHWC" if input_dtype == "uint8" else "NCHW",
                              "value_range": [0.0, 255.0] if input_dtype == "uint8" else [0.0, 1.0]}
        manifest["graph"] = {"outputs": "final", "input_dtype": input_dtype, "tensors": [
            {"task": o.task, "field": o.field, "dtype": o.dtype, "name": o.name} for o in graph_outputs]}
    Manifest.parse(manifest).write(manifest_path)
    return folder


def _final_fields(helper, task: TaskSpec, raw: str, nodes: list) -> dict[tuple[str, str], str]:
    """The nodes computing ``task``'s answer from its head output ``raw`` as its kind's reference
    post-processing does (float32, or int64 class indices); ``{(task, field): tensor}``."""
    t = task.name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{t}_{name}"], **attrs))
        return f"{t}_{name}"

    if task.kind == "segmentation":
        return {(t, "class_map"): node("ArgMax", [raw], "argmax", axis=1, keepdims=0),
                (t, "probabilities"): node("Softmax", [raw], "softmax", axis=1)}
    if task.kind == "depth":
        return {(t, "depth"): node("Squeeze", [node("Relu", [raw], "relu"), "channel_axis"], "metres")}
    if task.kind == "normal":
        return {(t, "normal"): node("Div", [raw, node("ReduceL2", [raw], "length", axes=[1], keepdims=1)], "unit")}
    if task.kind == "attributes":
        return {(t, "probabilities"): node("Sigmoid", [raw], "sigmoid")}
    if task.kind == "edges":
        edge = node("Where", [node("GreaterOrEqual", [raw, "zero"], "is_edge"), "edge", "zero"], "edge_where")
        return {(t, "edge_map"): node("Squeeze", [edge, "channel_axis"], "edge_map"),
                (t, "probabilities"): node("Squeeze", [node("Sigmoid", [raw], "sigmoid"), "channel_axis"], "prob")}
    raise ValueError(f"hand_built_export knows no final outputs of kind {task.kind!r}")


@register_backend("slow-onnxruntime")
class SlowBackend(OnnxRuntimeBackend):
    """ONNX Runtime with added delays (class attributes, seconds) to make timing-dependent cases deterministic."""

    load_delay = 0.0
    infer_delay = 0.0
    fail_infer = False

    async def load(self) -> None:
        await asyncio.sleep(self.load_delay)
        await super().load()

    async def infer(self, batch, outputs, deadline=None):
        if self.fail_infer:
            raise RuntimeError("injected backend failure")
        await asyncio.sleep(self.infer_delay)
        return await super().infer(batch, outputs, deadline)


assert BACKENDS["slow-onnxruntime"] is SlowBackend


class RunningGateway:
    """A `GatewayServer` on a background event loop; ``with RunningGateway(config) as gw:``."""

    def __init__(self, config: ServerConfig | None = None, *, wait_ready: bool = True, **settings) -> None:
        defaults = {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "threads": 1, "poll_interval_s": 0,
                    "grace_period_s": 5}
        self.config = config or ServerConfig(**{**defaults, **settings})
        self.wait_ready = wait_ready
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.server: GatewayServer | None = None
        self.started: asyncio.Future | None = None
        self._channel: grpc.Channel | None = None

    def call(self, coro, timeout: float = 60):
        """Run ``coro`` on the server's loop and return its result."""
        return self.call_soon(coro).result(timeout)

    def call_soon(self, coro) -> concurrent.futures.Future:
        """Start ``coro`` on the server's loop; the returned future holds its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        self.server = self.call(self._make())
        self.started = self.call_soon(self.server.start())
        if self.wait_ready:
            self.started.result(60)
        else:
            self.call(_until(lambda: self.server.http_port is not None and self.server.grpc_port is not None))
        return self

    async def _make(self) -> GatewayServer:
        return GatewayServer(self.config)

    def __exit__(self, *exc) -> None:
        if self._channel is not None:
            self._channel.close()
        try:
            self.call(self.server.stop(grace=1))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.grpc_target)
        return self._channel

    @property
    def stub(self) -> pb_grpc.PredictionServiceStub:
        return pb_grpc.PredictionServiceStub(self.channel)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.http_url, timeout=30, **kw)

    def wait_for_queue(self, model: str, running: int, queued: int, timeout: float = 30) -> None:
        """Block until ``model`` has ``running`` requests in forward passes and ``queued`` waiting."""

        def reached() -> bool:
            batcher = self.server.models.lease(model).batcher
            return (batcher.in_batches, batcher.depth) == (running, queued)

        self.call(_until(reached, timeout))

    def asgi(self, method: str, path: str, **kw) -> httpx.Response:
        """One request through the ASGI app in process (no socket), on the server's loop."""

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.server.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                return await client.request(method, path, **kw)

        return self.call(go())


async def _until(condition, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


def predict_until(stop: threading.Event, server: str, retry, image: bytes, on_result, failures: list[str],
                  model: str = "scenes") -> None:
    """Depth predictions with the project's client, back to back until ``stop`` is set: each result
    to ``on_result``, each error as ``"CODE: message"`` to ``failures`` (load across a disruption)."""
    from clients import Client, ClientError

    with Client(server, retry=retry, timeout=60) as client:
        while not stop.is_set():
            try:
                on_result(client.predict(model, image, tasks=["depth"]))
            except ClientError as exc:
                failures.append(f"{exc.code}: {exc}")
