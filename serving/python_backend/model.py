"""Triton python-backend model: runs the version's ONNX graph with ONNX Runtime on CPU.

Written by ``python -m serving.convert --format python`` next to ``model.onnx`` and
``manifest.json``. It serves CPU Triton deployments that lack the onnxruntime backend (such as the
server bundled in ``nvidia-pytriton``). The stub process imports ``numpy`` and ``onnxruntime`` from
the Python environment Triton runs it in.

Tensor names and dtypes come from the model config (generated from the export's tensor spec), so
this file holds no model-specific names; nor does it choose ONNX Runtime's settings: the config's
``onnxruntime.*`` parameters hold them (those of every session of this project,
``parsimony.onnxrt.session_settings``, written by the converter): a name with a dot is a session
config entry, any other an integer ``SessionOptions`` attribute. The version folder stays
self-contained: the stub cannot import this project. The python backend hands ``execute`` every request the
dynamic batcher gathered, one by one: they are concatenated along the batch dimension, run in one
ONNX Runtime call, and split back, so batching buys throughput here as it does in the ONNX Runtime
backend. Only the outputs the batch's requests ask for are computed: ONNX Runtime runs every node
of a graph whatever a run fetches, so a batch asking for fewer than all outputs runs a session over
the graph pruned to their union (``parsimony.onnxrt.prune``, from the copy the converter writes
beside this file; it needs the onnx package: without it every batch runs the whole graph). Each
response carries the outputs its request asked for; a request that names none gets every
output, as Triton's own backends answer it. Inputs and outputs keep the
dtypes of the config (uint8 pixels in, uint8 class maps and float16 maps out, as the graph has
them). A failing batch answers each of its requests with the error instead of killing the stub.
"""

import importlib.util
import json
import os
from collections import OrderedDict

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ORT_PARAMETER = "onnxruntime."  # serving.triton_config.ORT_PARAMETER
PRUNER_FILE = "parsimony_onnxrt.py"  # serving.convert.PRUNER_FILE: parsimony.onnxrt, copied beside this file
SESSIONS_KEPT = 8  # pruned sessions kept, most recently used first


def load_pruner(version_dir):
    """``prune(model, outputs)`` from the copy of parsimony.onnxrt beside this file, or None when the
    copy or the onnx package it needs is missing (every call then runs the whole graph)."""
    path = os.path.join(version_dir, PRUNER_FILE)
    try:
        import onnx  # noqa: F401  (prune needs it; checked here so a missing package degrades, not fails)
    except ImportError:
        return None
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("parsimony_onnxrt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prune


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        for key, value in params.items():
            if key.startswith(ORT_PARAMETER):
                name = key[len(ORT_PARAMETER) :]
                if "." in name:
                    options.add_session_config_entry(name, value)
                else:
                    setattr(options, name, int(value))
        self.model_path = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        self.options = options
        self.session = ort.InferenceSession(self.model_path, options, providers=["CPUExecutionProvider"])
        self.prune = load_pruner(version_dir)
        self.sessions = OrderedDict()
        self.inputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        missing = sorted(set(self.outputs) - {o.name for o in self.session.get_outputs()})
        if missing:
            raise pb_utils.TritonModelException(
                f"outputs {missing} of config.pbtxt are not in the ONNX graph; reconvert the run"
            )

    def execute(self, requests):
        try:
            feeds, sizes = self._gather(requests)
            wanted = [self._requested(r) for r in requests]
            names = [n for n in self.outputs if any(n in w for w in wanted)]
            results = dict(zip(names, self._session_for(names).run(names, feeds), strict=True))
        except Exception as exc:  # one bad request must not take down the others' stub
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size, names in zip(sizes, wanted, strict=True):
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(results[name][start : start + size]))
                       for name in self.outputs if name in names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _session_for(self, names):
        """ONNX Runtime runs every node of a graph whatever outputs a run asks for: a batch that needs
        fewer than all outputs runs a session over the graph pruned to those (made on first use)."""
        key = tuple(names)
        if self.prune is None or len(key) == len(self.outputs):
            return self.session
        if key not in self.sessions:
            pruned = self.prune(self.model_path, list(key))
            self.sessions[key] = ort.InferenceSession(pruned, self.options, providers=["CPUExecutionProvider"])
            while len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(key)
        return self.sessions[key]

    def _requested(self, request):
        names = set(request.requested_output_names())
        return names or set(self.outputs)

    def _gather(self, requests):
        feeds, sizes = {}, None
        for name, dtype in self.inputs:
            arrays = [pb_utils.get_input_tensor_by_name(r, name).as_numpy().astype(dtype, copy=False) for r in requests]
            feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            sizes = sizes or [a.shape[0] for a in arrays]
        return feeds, sizes

    def finalize(self):
        self.session = None
        self.sessions.clear()
