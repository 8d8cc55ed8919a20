"""Build a TensorRT plan (``model.plan``) from the exported ONNX graph with TensorRT's Python API.

A plan is tied to the GPU architecture and the TensorRT version it was built with, so it must be
built on the target GPU. TensorRT is an optional extra (``pip install 'parsimony[tensorrt]'`` on a
GPU host with NVIDIA's package index): it cannot be installed on this project's own machines, so
the import is guarded and `TensorRTMissing` says what to do instead. The TensorRT version must be
the one of the Triton image that will load the plan (`serving.ngc_release`); another version is
refused with `TensorRTVersionMismatch`.
Everything that does not need TensorRT itself (the optimisation profile, the ``trtexec`` flags of
the Kubernetes engine-builder Job, the settings) is plain Python and tested here.

The build: explicit batch (the only mode of TensorRT 10; the flag is set where it still exists),
one optimisation profile over batch 1..max at the spec's fixed image size (optimised for the
maximum, the size the dynamic batcher aims for; ``image:Bx3xHxW`` for a raw graph's float input,
``image:BxHxWx3`` for a final graph's uint8 pixels), FP16 when asked and the GPU has fast FP16, TF32
unless disabled, and a timing cache that is read before and written after, so rebuilding on the
same GPU skips most kernel timing (a cache TensorRT rejects, made on another GPU or version, is
reported, left as it is, and the build runs without it).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from parsimony.io import staged
from parsimony.spec import ModelIOSpec
from serving.ngc_release import NGC_RELEASE, TENSORRT_REQUIREMENT, TENSORRT_VERSION, same_release

log = logging.getLogger("serving.tensorrt_build")

ENGINE_BUILDER = "deploy/engine-builder"
_INSTEAD = (
    "TensorRT is not installed (`pip install 'parsimony[tensorrt]'` works only on a GPU host that reaches "
    "NVIDIA's package index). Instead: convert with `--format onnx` (add `--tensorrt-accelerator` to let "
    "Triton's ONNX Runtime backend build TensorRT engines on the GPU), or build the plan on the target GPU "
    f"with the Kubernetes Job in {ENGINE_BUILDER}/ (NVIDIA's TensorRT container, trtexec) and install it "
    "with `--format tensorrt --plan PATH`"
)


class TensorRTMissing(RuntimeError):
    """TensorRT cannot be imported; the message lists the alternatives."""


class TensorRTVersionMismatch(TensorRTMissing):
    """The installed TensorRT is not the release the serving image loads plans of."""


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse the graph or build an engine; the message carries its errors."""


def require_tensorrt():
    """The ``tensorrt`` module of the pinned release, or `TensorRTMissing` / `TensorRTVersionMismatch`."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTMissing(f"{_INSTEAD} (import failed: {exc})") from exc
    installed = str(getattr(trt, "__version__", "unknown"))
    if not same_release(installed):
        raise TensorRTVersionMismatch(
            f"TensorRT {installed} is installed, but the Triton image this project deploys (NGC {NGC_RELEASE}) "
            f"loads plans of TensorRT {TENSORRT_VERSION} only: a plan built here would not load there. Install "
            f"'{TENSORRT_REQUIREMENT}' (pip install 'parsimony[tensorrt]'), or build in {ENGINE_BUILDER}/ "
            f"(NVIDIA's TensorRT {NGC_RELEASE} container)")
    return trt


def tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except TensorRTMissing:
        return False
    return True


@dataclass(frozen=True)
class BuildSettings:
    max_batch: int
    fp16: bool = False
    tf32: bool = True
    workspace_bytes: int = 1 << 30
    timing_cache: Path | None = None  # read if present, written after the build

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if self.workspace_bytes < 1 << 20:
            raise ValueError(f"workspace_bytes {self.workspace_bytes} is below 1 MiB; TensorRT needs more")


def optimization_profile(spec: ModelIOSpec, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min, opt, max)}`` shapes: batch 1, ``max_batch`` and ``max_batch``, other dims fixed."""
    return {t.name: (t.concrete_shape(1), t.concrete_shape(max_batch), t.concrete_shape(max_batch))
            for t in spec.inputs}


def profile_shapes(spec: ModelIOSpec, max_batch: int) -> tuple[str, str, str]:
    """The profile as (min, opt, max) strings ``input:1x3xHxW,...``: trtexec's flags and ONNX Runtime's
    ``trt_profile_*_shapes`` options take this form."""
    profile = optimization_profile(spec, max_batch)
    return tuple(",".join(f"{name}:{'x'.join(map(str, dims[i]))}" for name, dims in profile.items())
                 for i in range(3))


def trtexec_args(spec: ModelIOSpec, settings: BuildSettings, onnx_path: str, plan_path: str) -> list[str]:
    """The ``trtexec`` command line that builds the same plan as `build_plan` (used by the Job)."""
    lo, opt, hi = profile_shapes(spec, settings.max_batch)
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}", f"--minShapes={lo}",
            f"--optShapes={opt}", f"--maxShapes={hi}",
            f"--memPoolSize=workspace:{settings.workspace_bytes >> 20}M"]
    if settings.fp16:
        args.append("--fp16")
    if not settings.tf32:
        args.append("--noTF32")
    if settings.timing_cache is not None:
        args.append(f"--timingCacheFile={settings.timing_cache}")
    return args


def build_plan(onnx_path: Path, plan_path: Path, spec: ModelIOSpec, settings: BuildSettings) -> Path:
    """Build and write ``plan_path`` (atomically); raises `TensorRTMissing` or `TensorRTBuildError`."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_explicit_batch_flag(trt))
    _parse_onnx(trt, network, logger, Path(onnx_path))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.fp16:
        if not builder.platform_has_fast_fp16:
            raise TensorRTBuildError("--fp16 was asked for, but this GPU has no fast FP16; build without it")
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in optimization_profile(spec, settings.max_batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache, cache_accepted = _load_timing_cache(config, settings.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine from {onnx_path}; see its log above")
    with staged(Path(plan_path)) as tmp:
        tmp.write_bytes(bytes(serialized))
    if settings.timing_cache is not None and cache_accepted:
        with staged(Path(settings.timing_cache)) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
    return Path(plan_path)


def _explicit_batch_flag(trt) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # deprecated in TensorRT 10
    return 0 if flag is None else 1 << int(flag)


def _parse_onnx(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")


def _load_timing_cache(config, path: Path | None):
    """(cache, accepted). TensorRT refuses a cache made on another GPU or TensorRT version
    (``set_timing_cache`` returns False): then the build times kernels from scratch with an empty
    cache, and the refused file is not overwritten, since it may serve the GPU it was made on."""
    data = Path(path).read_bytes() if path is not None and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache, True
    log.warning("TensorRT refused the timing cache %s (made on another GPU or TensorRT version); building "
                "without it, and leaving the file as it is: point --timing-cache at a file of this GPU's own", path)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TensorRTBuildError("TensorRT refused even an empty timing cache; build without one")
    return cache, False
