"""The Triton python-backend model file (serving/python_backend/model.py) outside Triton: the
converter's version folder loaded with a stand-in for ``triton_python_backend_utils`` (the module
Triton's stub process provides), so what it computes per batch can be inspected. Against the real
tritonserver it runs in tests/test_triton_direct.py and tests/test_triton_integration.py."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from gateway_support import hand_built_export

from parsimony.tasks import TaskSpec
from serving.convert import main as convert_main

TASKS = (TaskSpec("segmentation", "segmentation", 3, ("a", "b", "c")), TaskSpec("depth", "depth", 1),
         TaskSpec("normal", "normal", 3))


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _Request:
    def __init__(self, inputs: dict, outputs: list[str]):
        self.inputs, self.outputs = inputs, outputs

    def requested_output_names(self):
        return self.outputs


def _stand_in() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor
    pb.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(
        tensors={t.name: t.array for t in output_tensors}, error=error)
    pb.TritonError = RuntimeError
    pb.TritonModelException = RuntimeError
    pb.triton_string_to_numpy = lambda name: np.dtype({"TYPE_UINT8": "u1", "TYPE_FP32": "f4", "TYPE_FP16": "f2",
                                                        "TYPE_INT32": "i4"}[name])
    pb.get_input_tensor_by_name = lambda request, name: _Tensor(name, request.inputs[name])
    return pb


@pytest.fixture()
def backend_model(tmp_path, monkeypatch):
    """The converted version's model.py, initialised as Triton would (config as JSON, its folder)."""
    export = hand_built_export(tmp_path / "export", TASKS, final=True)
    repo = tmp_path / "repo"
    assert convert_main([str(export), "--repository", str(repo), "--name", "m", "--format", "python"]) == 0
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stand_in())
    spec = importlib.util.spec_from_file_location("converted_model", repo / "m" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse((repo / "m" / "config.pbtxt").read_text(), mc.ModelConfig())
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                      "model_repository": str(repo / "m"), "model_version": "1"})
    return model, module


def _pixels(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 48, 3), dtype=np.uint8)


def test_a_batch_asking_for_some_outputs_runs_a_session_pruned_to_them(backend_model):
    model, module = backend_model
    assert model.prune is not None  # the converter wrote the pruner beside model.py, onnx is installed here
    full = model.execute([_Request({"image": _pixels(1)}, [])])[0].tensors  # no names: every output
    assert set(full) == set(model.outputs) and not model.sessions
    answers = model.execute([_Request({"image": _pixels(1)}, ["depth"]),
                             _Request({"image": _pixels(1)}, ["segmentation", "depth"])])
    assert [set(a.tensors) for a in answers] == [{"depth"}, {"segmentation", "depth"}]
    (key, session), = model.sessions.items()  # one pruned session for the batch's union
    assert key == ("segmentation", "depth") and [o.name for o in session.get_outputs()] == list(key)
    for answer in answers:  # the pruned graph answers as the whole graph does, byte for byte
        for name, value in answer.tensors.items():
            assert value.tobytes() == full[name].tobytes(), name


def test_pruned_sessions_are_kept_most_recent_first_and_bounded(backend_model):
    model, module = backend_model
    names = [o for o in model.outputs if o != "segmentation"]
    for name in names + [names[0]]:
        model.execute([_Request({"image": _pixels(2)}, [name])])
    assert len(model.sessions) == min(len(names), module.SESSIONS_KEPT)
    assert next(reversed(model.sessions)) == (names[0],)  # the last one used is the most recent


def test_without_the_onnx_package_every_batch_runs_the_whole_graph(backend_model, monkeypatch):
    model, module = backend_model
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    assert module.load_pruner(str(Path(model.model_path).parent)) is None
    model.prune = None
    answer = model.execute([_Request({"image": _pixels(3)}, ["depth"])])[0]
    assert set(answer.tensors) == {"depth"} and not model.sessions
