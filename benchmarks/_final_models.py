"""The models of `benchmarks.final_graph` and `benchmarks.triton_gateway`, each exported twice from
one compact model, and what a gateway call moves on each hop.

- ``raw`` (before; ``python -m training.export RUN --raw-outputs``): float32 ``[N, 3, H, W]`` input in
  [0, 1], each task's head output (logits); the gateway converts uint8 pixels and post-processes
  every task in Python (`parsimony.tasks.Kind.postprocess`).
- ``final`` (after; the export's default): uint8 ``[N, H, W, 3]`` input, the answers computed in the
  graph (class map, clamped depth, unit normals, ...; probabilities and float16 copies as outputs of
  their own); the gateway passes the tensors it asked for through.

Models (untrained: weights do not change the cost; 50 % of the encoder's channels zeroed at random
and compacted with round_to 8, as in `benchmarks.compaction`):

- ``demo``: the demo's ``tiny`` encoder, light heads, synthetic-scenes tasks (segmentation with 7
  classes, depth, normal), 96x128;
- ``resnet50d-os8``: the paper's dilated ResNet-50-D with ASPP heads at 288x384 with NYU-v2's tasks
  (segmentation with 13 classes, depth, normal).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parsimony.layout import MANIFEST_FILE, ONNX_FILE
from parsimony.manifest import Manifest
from parsimony.tasks import RAW
from serving.server import codec
from serving.server.codec import TaskResult
from serving.server.metadata import ModelMetadata

GRAPHS = ("raw", "final")  # before, after
SPARSITY, ROUND_TO = 50, 8
# fixed server timings in the responses whose size is computed (zero fields would be left out of the proto)
TIMINGS_MS = {"decode": 0.5, "preprocess": 0.5, "queue": 0.5, "inference": 0.5, "postprocess": 0.5, "total": 2.5}


@dataclass(frozen=True)
class Case:
    name: str
    encoder: str
    tasks: str  # "module:ATTRIBUTE" of the data set's task specs (imported lazily: it brings torch)
    image_size: tuple[int, int]
    quick_size: tuple[int, int]

    def size(self, quick: bool) -> tuple[int, int]:
        return self.quick_size if quick else self.image_size

    def task_specs(self) -> tuple:
        module, attribute = self.tasks.split(":")
        return getattr(importlib.import_module(module), attribute)


CASES = {
    "demo": Case("demo (tiny encoder, light heads; segmentation 7 classes, depth, normal)", "tiny",
                 "training.data.synthetic_scenes:DEFAULT_TASKS", (96, 128), (32, 48)),
    "resnet50d-os8": Case("dilated ResNet-50-D OS8, ASPP heads; NYU-v2 tasks (segmentation 13 classes, depth, "
                          "normal)", "resnet50d-os8", "training.data.nyuv2:TASKS", (288, 384), (64, 96)),
}


# --- building and exporting -------------------------------------------------------------------------


def export_pair(key: str, size: tuple[int, int], folders: Mapping[str, Path], seed: int = 0) -> dict[str, Path]:
    """Build model ``key`` (module doc) and export it into ``folders[graph]`` for each graph of
    `GRAPHS` given: ``model.onnx`` and ``manifest.json`` in each, a folder that `serving.convert`
    takes as a run and the gateway as a repository's version folder."""
    import torch

    from benchmarks.compaction import sparsify
    from training.compaction import compact
    from training.models import create_model

    case = CASES[key]
    torch.manual_seed(0)
    tasks = case.task_specs()
    dense = create_model(encoder=case.encoder, tasks=tasks, name="-".join([case.encoder, *(t.name for t in tasks)])).eval()
    small, plan = compact(sparsify(dense, SPARSITY, seed), round_to=ROUND_TO)
    extra = {"benchmark": f"{case.name}, untrained, {SPARSITY} % of its encoder channels removed (round_to {ROUND_TO})",
             "compaction": {"round_to": plan.round_to, "widths": plan.widths()}}
    for graph, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        _export(small, folder, size, graph, extra)
    return dict(folders)


def _export(model, folder: Path, size: tuple[int, int], graph: str, extra: dict) -> None:
    from training.export import build_manifest, export_onnx

    report = export_onnx(model, folder / ONNX_FILE, image_size=size, check_batch_sizes=(1,),
                         raw_outputs=graph == "raw")
    manifest = build_manifest(model, report.io_spec, image_size=size, report=report, extra=extra)
    manifest.write(folder / MANIFEST_FILE)


# --- what a call moves ------------------------------------------------------------------------------


def metadata(folder: Path, name: str) -> ModelMetadata:
    """The gateway's view of the graph in ``folder`` (served as ``name``, version 1)."""
    return ModelMetadata.from_manifest(name, 1, Manifest.load(folder / MANIFEST_FILE))


def call_outputs(meta: ModelMetadata, *, dtype: str = "float32", probabilities: bool = False) -> dict[str, tuple]:
    """``{tensor name: (task, field)}``: the graph outputs the gateway asks its backend for when a
    call wants every task (`ModelMetadata.outputs_for`; a raw graph: each head output, field `RAW`)."""
    return {name: (task, field) for task in meta.tasks for field, name in meta.outputs_for(task, dtype, probabilities)}


def answers(meta: ModelMetadata, outputs: Mapping[str, tuple], tensors: Mapping[str, np.ndarray], index: int, *,
            dtype: str = "float32", probabilities: bool = False) -> dict[str, TaskResult]:
    """Image ``index``'s answer per task from the tensors of `call_outputs`, as the gateway makes it:
    a final graph's outputs passed through (`codec.final_result`), a raw graph's head outputs
    post-processed in Python (`codec.postprocess`, i.e. `parsimony.tasks.Kind.postprocess`)."""
    fields: dict[str, dict[str, np.ndarray]] = {}
    tasks = {}
    for name, (task, field) in outputs.items():
        tasks[task.name] = task
        fields.setdefault(task.name, {})[field] = tensors[name][index]
    if meta.final:
        return {name: codec.final_result(tasks[name], f) for name, f in fields.items()}
    wire = codec.output_dtype(dtype)
    return {name: codec.postprocess(tasks[name], f[RAW], wire, probabilities) for name, f in fields.items()}


def graph_input(meta: ModelMetadata, images: np.ndarray) -> np.ndarray:
    """``uint8 [N, H, W, 3]`` images as the gateway hands them to its backend: each as the graph
    takes it (`codec.model_input`: unchanged for a uint8 input, ``x / 255`` CHW for a float32 one),
    stacked as the batcher stacks them."""
    return np.stack([codec.model_input(image, meta) for image in images])


# --- bytes on each hop ------------------------------------------------------------------------------


def triton_request_bytes(model: str, image: np.ndarray, outputs: Sequence[str]) -> int:
    """The serialized size of tritonclient's gRPC ``ModelInferRequest`` sending ``image`` (with its
    batch dimension) as the graph's input and asking for ``outputs``."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype

    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="image", datatype=np_to_triton_dtype(image.dtype))
    tensor.shape.extend(image.shape)
    request.raw_input_contents.append(image.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request.ByteSize()


def triton_response_bytes(model: str, tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """``tensors``: their payload and the size of Triton's gRPC ``ModelInferResponse`` carrying them."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype

    response = service_pb2.ModelInferResponse(model_name=model, model_version="1")
    for name, array in tensors.items():
        tensor = response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype))
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return {"tensors": sum(a.nbytes for a in tensors.values()), "message": response.ByteSize()}


def client_response_bytes(model: str, answer: Mapping[str, TaskResult]) -> dict[str, int]:
    """The gateway's answer (per task) as sent to its client: the gRPC ``PredictResponse`` and the
    HTTP JSON body, with fixed server timings (`TIMINGS_MS`), and the tensors' payload."""
    from serving.server.grpc_service import prediction_to_proto
    from serving.server.http_app import prediction_to_json
    from serving.server.service import Prediction, Timings

    timings = Timings(**{k: v / 1e3 for k, v in TIMINGS_MS.items()}, batch_size=1)
    prediction = Prediction(model, 1, dict(answer), timings)
    body = json.dumps(prediction_to_json(prediction), separators=(",", ":")).encode()
    arrays = [v for result in answer.values() for v in result.fields.values() if isinstance(v, np.ndarray)]
    return {"tensors": sum(a.nbytes for a in arrays), "grpc": prediction_to_proto(prediction).ByteSize(),
            "json": len(body)}
