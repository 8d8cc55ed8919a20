"""``config.pbtxt`` generated from Triton's own ``ModelConfig`` protobuf and the export's tensor spec.

Writing the config by hand lets tensor names, dtypes and dims drift from the graph. Here every
input and output comes from the same `ModelIOSpec` that named and checked the ONNX graph
(`parsimony.spec`), and the text is produced by ``google.protobuf.text_format`` from
``tritonclient``'s generated ``model_config_pb2`` (a mistyped field or enum fails here, not in the
server). `config_io_spec` maps a config back to a tensor spec, so a config can be checked against
the graph it serves (``config_io_spec(parse_config(text)).check_against_onnx(path)``).

What the generated config holds, and why:

- ``max_batch_size`` and dims without the batch dimension (the graph's batch dim is dynamic);
- dynamic batching, preferred batch sizes (powers of two up to the maximum) and a small queue
  delay (100 µs by default: a CPU python-backend model answers in about 0.5 ms, and a 500 µs
  delay doubles that at low load, as measured with the bundled Triton);
- one instance group, ``KIND_GPU`` or ``KIND_CPU``, with ``--instances`` copies;
- warm-up requests with random data at batch 1 and at the maximum, so the first user request
  does not pay for lazy initialisation (ONNX Runtime arenas, TensorRT engine builds);
- a version policy serving only the latest version (old versions stay on disk for roll-back until
  ``--keep`` prunes them);
- the inputs' and outputs' Triton types as the spec has them: a final graph's ``TYPE_UINT8``
  ``[H, W, 3]`` image, its UINT8 / INT32 class and edge maps, FP32 answers and their FP16 copies;
- ``label_filename`` (files next to the config, from `serving.export_check.label_files`) on every
  output with one channel per class or attribute: a final graph's probability maps, attribute
  probabilities and raw logits, a raw graph's segmentation and attribute outputs;
- for ``onnx`` optionally the ONNX Runtime backend's TensorRT execution accelerator
  (``precision_mode`` FP16 with ``--fp16``);
- for ``python`` the graph's file name and the ONNX Runtime session settings (the same as every other
  session of this project builds, `parsimony.onnxrt`), as parameters: the model file that Triton runs
  cannot import this project.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from parsimony import onnxrt
from parsimony.errors import ConfigError
from parsimony.layout import ONNX_FILE, TENSORRT_FILE
from parsimony.spec import DTYPES, DYNAMIC, ModelIOSpec, TensorSpec
from serving.tensorrt_build import profile_shapes

DEVICES = ("gpu", "cpu")
_KINDS = {"gpu": mc.ModelInstanceGroup.KIND_GPU, "cpu": mc.ModelInstanceGroup.KIND_CPU}
_TRITON_TO_DTYPE = {d.triton: name for name, d in DTYPES.items()}
MAX_BATCH_LIMIT = 4096
DEFAULT_WORKSPACE_BYTES = 1 << 30
# Where Triton's ONNX Runtime keeps the TensorRT engines it builds (--tensorrt-accelerator): a
# writable volume in the Triton pod that outlives it (deploy/k8s/overlays/gpu mounts it here).
ENGINE_CACHE_DIR = "/engine-cache"
# python format: the ONNX Runtime session settings (`parsimony.onnxrt.session_settings`) travel as
# config parameters named with this prefix; the model (serving/python_backend/model.py) applies them
ORT_PARAMETER = "onnxruntime."


@dataclass(frozen=True)
class ModelFormat:
    """One way to serve the exported graph: what Triton runs it with and on which devices."""

    name: str
    model_file: str  # Triton's default file name for the platform/backend
    platform: str = ""  # a platform (onnxruntime_onnx, tensorrt_plan) ...
    backend: str = ""  # ... or a backend (python)
    devices: tuple[str, ...] = DEVICES
    default_device: str = "gpu"


FORMATS: dict[str, ModelFormat] = {
    "onnx": ModelFormat("onnx", ONNX_FILE, platform="onnxruntime_onnx"),
    "tensorrt": ModelFormat("tensorrt", TENSORRT_FILE, platform="tensorrt_plan", devices=("gpu",)),
    "python": ModelFormat("python", "model.py", backend="python", devices=("cpu",), default_device="cpu"),
}


def get_format(name: str) -> ModelFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


@dataclass(frozen=True)
class ServingOptions:
    """How the model is batched, placed and accelerated; refuses contradictory combinations."""

    format: str = "onnx"
    max_batch: int = 8
    instances: int = 1
    device: str | None = None  # None: the format's default device
    queue_delay_us: int = 100
    tensorrt_accelerator: bool = False  # onnx only: ONNX Runtime's TensorRT execution provider
    fp16: bool = False  # tensorrt: FP16 kernels in the plan; onnx: the accelerator's precision
    warmup: bool = True
    intra_op_threads: int = 0  # python backend: ONNX Runtime threads per instance, 0 = its default

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        _positive("--max-batch", self.max_batch, MAX_BATCH_LIMIT)
        _positive("--instances", self.instances, 64)
        if self.queue_delay_us < 0 or self.intra_op_threads < 0:
            raise ConfigError("--queue-delay-us and the thread count must not be negative")
        device = self.device or fmt.default_device
        if device not in fmt.devices:
            raise ConfigError(
                f"format {fmt.name!r} runs on {'/'.join(fmt.devices)} only, not {device!r}: "
                + ("use --format onnx for GPU serving" if fmt.name == "python" else "drop --device cpu")
            )
        object.__setattr__(self, "device", device)
        if self.tensorrt_accelerator and (fmt.name != "onnx" or device != "gpu"):
            raise ConfigError("--tensorrt-accelerator applies to --format onnx on --device gpu only")
        if self.intra_op_threads and fmt.name != "python":
            raise ConfigError("--threads sets ONNX Runtime's threads in the python backend: use it with --format python")
        if self.fp16 and not (fmt.name == "tensorrt" or self.tensorrt_accelerator):
            raise ConfigError(
                "--fp16 sets TensorRT's precision: use it with --format tensorrt, or with --format onnx "
                "--tensorrt-accelerator (ONNX Runtime on CPU and the python backend run FP32)"
            )

    @property
    def model_format(self) -> ModelFormat:
        return FORMATS[self.format]

    @classmethod
    def default(cls, name: str):
        """The default of option ``name`` (the converter's ``--help`` shows these)."""
        return cls.__dataclass_fields__[name].default


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 2 up to ``max_batch``, and ``max_batch`` itself."""
    sizes = [2**k for k in range(1, max_batch.bit_length()) if 2**k < max_batch]
    return sizes + [max_batch] if max_batch > 1 else []


def build_config(
    name: str, spec: ModelIOSpec, options: ServingOptions, labels: dict[str, str] | None = None
) -> mc.ModelConfig:
    """The ``ModelConfig`` serving ``spec`` as model ``name``; ``labels`` maps output names to
    label file names (relative to the model folder)."""
    labels = dict(labels or {})
    unknown = sorted(set(labels) - set(spec.output_names))
    if unknown:
        raise ConfigError(f"label files for {unknown}, which are not outputs ({list(spec.output_names)})")
    fmt = options.model_format
    config = mc.ModelConfig(name=name, platform=fmt.platform, backend=fmt.backend,
                            max_batch_size=options.max_batch)
    config.version_policy.latest.num_versions = 1
    for tensor in spec.inputs:
        config.input.add(name=tensor.name, data_type=_triton_type(tensor), dims=_dims(tensor))
    for tensor in spec.outputs:
        config.output.add(name=tensor.name, data_type=_triton_type(tensor), dims=_dims(tensor),
                          label_filename=labels.get(tensor.name, ""))
    config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes(options.max_batch))
    config.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us
    config.instance_group.add(kind=_KINDS[options.device], count=options.instances)
    if options.warmup:
        _add_warmup(config, spec, options.max_batch)
    if options.tensorrt_accelerator:
        _tensorrt_accelerator(config, name, spec, options)
    if fmt.name == "python":
        config.parameters["onnx_file"].string_value = FORMATS["onnx"].model_file
        for setting, value in onnxrt.session_settings(options.intra_op_threads).items():
            config.parameters[f"{ORT_PARAMETER}{setting}"].string_value = value
    return config


def _tensorrt_accelerator(config: mc.ModelConfig, name: str, spec: ModelIOSpec, options: ServingOptions) -> None:
    """ONNX Runtime's TensorRT execution provider inside Triton. Its engines are built when the model
    loads; with one optimisation profile over batch 1..max (the plan builder's) they are built once,
    not once per new batch size, and with the engine and timing caches on a volume that outlives the
    pod (``ENGINE_CACHE_DIR``, mounted by deploy/k8s/overlays/gpu) a restart loads them instead."""
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    params = accelerator.parameters
    params["precision_mode"] = "FP16" if options.fp16 else "FP32"
    params["max_workspace_size_bytes"] = str(DEFAULT_WORKSPACE_BYTES)
    cache = f"{ENGINE_CACHE_DIR}/{name}"
    params.update(trt_engine_cache_enable="1", trt_engine_cache_path=cache,
                  trt_timing_cache_enable="1", trt_timing_cache_path=cache)
    lo, opt, hi = profile_shapes(spec, options.max_batch)
    params.update(trt_profile_min_shapes=lo, trt_profile_opt_shapes=opt, trt_profile_max_shapes=hi)


def render(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"not a valid Triton model config: {exc}") from exc


def config_io_spec(config: mc.ModelConfig) -> ModelIOSpec:
    """The tensor spec a config declares (batch dimension restored), to compare with a graph."""
    def tensor(t) -> TensorSpec:
        type_name = mc.DataType.Name(t.data_type)
        if type_name not in _TRITON_TO_DTYPE:
            raise ConfigError(f"tensor {t.name!r} has data type {type_name}, which no export produces")
        batch = (DYNAMIC,) if config.max_batch_size > 0 else ()
        return TensorSpec(t.name, _TRITON_TO_DTYPE[type_name], batch + tuple(t.dims))

    return ModelIOSpec(inputs=tuple(map(tensor, config.input)), outputs=tuple(map(tensor, config.output)))


def _add_warmup(config: mc.ModelConfig, spec: ModelIOSpec, max_batch: int) -> None:
    for batch in sorted({1, max_batch}):
        warmup = config.model_warmup.add(name=f"random_batch_{batch}", batch_size=batch, count=1)
        for tensor in spec.inputs:
            warmup.inputs[tensor.name].data_type = _triton_type(tensor)
            warmup.inputs[tensor.name].dims.extend(_dims(tensor))
            warmup.inputs[tensor.name].random_data = True


def _triton_type(tensor: TensorSpec) -> int:
    return mc.DataType.Value(tensor.element_type.triton)


def _dims(tensor: TensorSpec) -> list[int]:
    """Dims without the batch dimension, which Triton adds from max_batch_size."""
    if not tensor.shape or tensor.shape[0] != DYNAMIC:
        raise ConfigError(f"tensor {tensor.name!r} has shape {list(tensor.shape)}: Triton batching needs "
                          f"a dynamic first (batch) dimension; re-export the model")
    rest = tensor.shape[1:]
    if DYNAMIC in rest:
        raise ConfigError(f"tensor {tensor.name!r} has dynamic dims after the batch dimension "
                          f"{list(tensor.shape)}; warm-up needs fixed dims, re-export at a fixed size")
    return list(rest)


def _positive(flag: str, value: int, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ConfigError(f"{flag} must be an integer from 1 to {limit}, got {value!r}")
