"""`python -m serving.convert RUN_DIR --repository model_repository --name NAME`: a Triton model
repository from an exported run.

    python -m serving.convert runs/demo --name scenes                      # onnxruntime_onnx on GPU
    python -m serving.convert runs/demo --name scenes --format python      # CPU Triton, ONNX Runtime inside
    python -m serving.convert runs/demo --name scenes --tensorrt-accelerator --fp16
    python -m serving.convert runs/demo --name scenes_trt --format tensorrt --fp16   # needs TensorRT + GPU
    python -m serving.convert model_repository/scenes/3 --name scenes_trt --format tensorrt --plan model.plan

RUN_DIR is any folder holding ``model.onnx`` and ``manifest.json`` (a training run, or a version of
an ``onnx`` model in a repository). Each call adds the next version of NAME, rewrites
``config.pbtxt`` and the label files from the export's tensor spec, and with ``--keep N`` deletes
all but the newest N versions. Everything is checked before anything is written: a run without an
export, a damaged manifest or ONNX file, a graph that is not the one its manifest describes (see
`serving.export_check`), an unknown format, a name Triton would reject, contradictory options or a
missing TensorRT end with an error (exit status 2) and leave the repository as it was.

Writes are crash-safe: killed at any instant (even with SIGKILL), the conversion leaves a repository
that Triton and the gateway load, with the model either absent, at its previous version or at the
new one; what a killed run left behind is hidden from both servers and deleted by the next
conversion. The repository layout and how it is written are described in `serving.repository`, the
config in `serving.triton_config`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from parsimony.layout import MANIFEST_FILE, MODEL_CONFIG_FILE, ONNX_FILE
from parsimony.manifest import sha256_file
from serving import repository as repo_layout
from serving.export_check import ConvertError, ExportedModel, label_files, load_export
from serving.tensorrt_build import (
    BuildSettings,
    TensorRTBuildError,
    TensorRTMissing,
    build_plan,
    require_tensorrt,
)
from serving.triton_config import (
    FORMATS,
    ServingOptions,
    build_config,
    config_io_spec,
    parse_config,
    render,
)

__all__ = ["ConvertError", "ConvertResult", "ExportedModel", "convert", "label_files", "load_export", "main"]

log = logging.getLogger("serving")
PYTHON_MODEL = FORMATS["python"].model_file
PRUNER_FILE = "parsimony_onnxrt.py"  # parsimony.onnxrt beside the python backend's model.py, which loads it
TIMING_CACHE = ".tensorrt-timing.cache"  # per repository, next to the models (Triton ignores files there)
# Test hook, read once by main(): comma-separated write steps (repository.WRITE_STEPS, or "onnx-copied")
# at which the process announces "paused at STEP" on stderr and waits to be killed.
PAUSE_ENV = "PARSIMONY_CONVERT_PAUSE_AT"


@dataclass(frozen=True)
class ConvertResult:
    model_dir: Path
    version_dir: Path
    config_text: str
    removed: tuple[int, ...] = ()

    @property
    def version(self) -> int:
        return int(self.version_dir.name)


def convert(
    run_dir: Path,
    repository: Path,
    name: str,
    options: ServingOptions,
    *,
    keep: int | None = None,
    plan: Path | None = None,
    timing_cache: Path | None = None,
) -> ConvertResult:
    """Add the next version of ``name`` to ``repository``; nothing is written unless every check passes."""
    repository = Path(repository)
    repo_layout.validate_model_name(name)
    export = load_export(run_dir)
    _check_arguments(repository, options, keep, plan, timing_cache)
    labels = label_files(export.manifest)
    config_text = render(build_config(name, export.spec, options, {k: f for k, (f, _) in labels.items()}))
    _check_existing_model(repository, name, options, export)
    if options.format == "tensorrt" and plan is None:
        require_tensorrt()
    model_files = {MODEL_CONFIG_FILE: config_text, **dict(labels.values())}
    cache = timing_cache or repository / TIMING_CACHE
    version_dir = _write_model(repository, name, model_files,
                               lambda folder: STAGERS[options.format](folder, export, options, plan, cache))
    removed = tuple(repo_layout.prune(repository, name, keep)) if keep else ()
    return ConvertResult(repo_layout.model_dir(repository, name), version_dir, config_text, removed)


def _write_model(repository: Path, name: str, model_files: dict[str, str], fill) -> Path:
    """Publish a version filled by ``fill(folder)`` and the model's top-level files so that the
    repository loads at every instant: a new model is assembled out of the servers' sight and appears
    with one rename; an existing one gets the version first (its tensors match the config in place),
    then its label files and config. A failed ``fill`` (a plan build) publishes nothing."""
    repo_layout.clean_leftovers(repository)
    if _is_new_model(repository, name):
        with repo_layout.staged_model(repository, name) as staged:
            repo_layout.write_files(staged.path, model_files)
            (staged.path / "1").mkdir()
            fill(staged.path / "1")
        return staged.final / "1"
    with repo_layout.staged_version(repository, name) as staged:
        fill(staged.path)
    repo_layout.write_model_files(repository, name, model_files)
    return staged.final


def _is_new_model(repository: Path, name: str) -> bool:
    folder = repo_layout.model_dir(repository, name)
    return not folder.exists() or (not (folder / MODEL_CONFIG_FILE).exists() and not any(folder.iterdir()))


def _stage_onnx(folder: Path, export: ExportedModel, *_unused) -> None:
    shutil.copy2(export.onnx_path, folder / ONNX_FILE)
    repo_layout.step("onnx-copied")
    shutil.copy2(export.directory / MANIFEST_FILE, folder / MANIFEST_FILE)
    if sha256_file(folder / ONNX_FILE) != export.onnx_sha256:
        raise ConvertError(f"{export.onnx_path} changed while it was being copied; run the conversion again")


def _stage_python(folder: Path, export: ExportedModel, *_unused) -> None:
    _stage_onnx(folder, export)
    template = resources.files("serving.python_backend").joinpath(PYTHON_MODEL)
    (folder / PYTHON_MODEL).write_text(template.read_text())
    # the model file cannot import this project: it loads the graph pruner from this copy
    (folder / PRUNER_FILE).write_text(resources.files("parsimony").joinpath("onnxrt.py").read_text())


def _stage_tensorrt(folder: Path, export: ExportedModel, options: ServingOptions, plan: Path | None,
                    timing_cache: Path) -> None:
    _stage_onnx(folder, export)  # the portable artifact: plans are rebuilt from it for another GPU
    target = folder / FORMATS["tensorrt"].model_file
    if plan is not None:
        shutil.copy2(plan, target)
        return
    settings = BuildSettings(max_batch=options.max_batch, fp16=options.fp16, timing_cache=timing_cache)
    build_plan(export.onnx_path, target, export.spec, settings)


STAGERS = {"onnx": _stage_onnx, "python": _stage_python, "tensorrt": _stage_tensorrt}


def _check_arguments(repository: Path, options: ServingOptions, keep: int | None, plan: Path | None,
                     timing_cache: Path | None) -> None:
    if repository.exists() and not repository.is_dir():
        raise ConvertError(f"--repository {repository} is a file; pass a folder (created when missing)")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ConvertError(f"--keep must be a positive number of versions to keep, got {keep!r}")
    if timing_cache is not None and (options.format != "tensorrt" or plan is not None):
        raise ConvertError("--timing-cache is for building a plan: use it with --format tensorrt, without --plan")
    if plan is not None:
        if options.format != "tensorrt":
            raise ConvertError("--plan installs a prebuilt TensorRT plan: use it with --format tensorrt")
        if not Path(plan).is_file():
            raise ConvertError(f"--plan {plan} does not exist; build it first (see deploy/engine-builder)")


def _check_existing_model(repository: Path, name: str, options: ServingOptions, export: ExportedModel) -> None:
    """Refuse to add a version in another format or with other tensors: one config serves all
    versions of a model, and the config in place serves the new version until it is rewritten."""
    folder = repo_layout.model_dir(repository, name)
    path = folder / MODEL_CONFIG_FILE
    if not path.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise ConvertError(f"{folder} exists without a {path.name}, so it is no model this tool wrote: "
                               f"delete it, or convert under another --name")
        return
    try:
        existing = parse_config(path.read_text())
        existing_spec = config_io_spec(existing)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConvertError(f"{path} cannot be read as a Triton config ({exc}); delete {folder} to replace "
                           f"the model, or convert under another --name") from None
    fmt = options.model_format
    fix = f"convert under another --name, or delete {folder} to replace the model"
    if (existing.platform, existing.backend) != (fmt.platform, fmt.backend):
        served = existing.platform or f"the {existing.backend} backend"
        raise ConvertError(f"model {name!r} in {repository} is served by {served}, not "
                           f"{fmt.platform or fmt.backend}: {fix}")
    if existing_spec != export.spec:
        raise ConvertError(
            f"the export's tensors {export.spec.to_dict()} differ from those of model {name!r} ({path}: "
            f"{existing_spec.to_dict()}); Triton would load one version with the other's config: {fix}"
        )


def describe(result: ConvertResult, options: ServingOptions) -> str:
    fmt = options.model_format
    how = fmt.platform or f"{fmt.backend} backend"
    text = (f"wrote {result.version_dir} ({how}, max batch {options.max_batch}, {options.instances} "
            f"{options.device.upper()} instance(s)); config {result.model_dir / MODEL_CONFIG_FILE}")
    if result.removed:
        text += f"; pruned versions {list(result.removed)}"
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ServingOptions.default
    p.add_argument("run_dir", type=Path, help=f"a folder with {ONNX_FILE} and {MANIFEST_FILE} (a training run)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="the Triton model repository")
    p.add_argument("--name", required=True, help="the model's name in Triton (its folder name)")
    p.add_argument("--format", default=d("format"), help=f"one of {', '.join(FORMATS)} (default {d('format')})")
    p.add_argument("--fp16", action="store_true", help="FP16 TensorRT (tensorrt, or onnx with --tensorrt-accelerator)")
    p.add_argument("--max-batch", type=int, default=d("max_batch"),
                   help=f"max_batch_size and the largest preferred batch (default {d('max_batch')})")
    p.add_argument("--instances", type=int, default=d("instances"),
                   help=f"model instances (copies) per device (default {d('instances')})")
    p.add_argument("--device", choices=("gpu", "cpu"), help="instance kind (default: gpu, cpu for python)")
    p.add_argument("--keep", type=int, help="keep only the newest N versions")
    p.add_argument("--tensorrt-accelerator", action="store_true",
                   help="onnx: let ONNX Runtime run the graph through TensorRT on the GPU")
    p.add_argument("--queue-delay-us", type=int, default=d("queue_delay_us"),
                   help=f"dynamic batching queue delay (µs, default {d('queue_delay_us')})")
    p.add_argument("--threads", type=int, default=d("intra_op_threads"),
                   help=f"python: ONNX Runtime threads per instance (default {d('intra_op_threads')}: its default)")
    p.add_argument("--no-warmup", action="store_true", help="do not declare warm-up requests")
    p.add_argument("--plan", type=Path, help="tensorrt: install this prebuilt plan instead of building one")
    p.add_argument("--timing-cache", type=Path, help=f"tensorrt: timing cache file (default REPOSITORY/{TIMING_CACHE})")
    return p


def pause_at(steps: str) -> None:
    """Install the test hook: at each named step, say so on stderr and wait to be killed."""
    wanted = {s.strip() for s in steps.split(",") if s.strip()}

    def hook(step: str) -> None:
        if step in wanted:
            print(f"paused at {step}", file=sys.stderr, flush=True)
            while True:
                signal.pause()

    repo_layout.on_step(hook)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if os.environ.get(PAUSE_ENV):
        pause_at(os.environ[PAUSE_ENV])
    try:
        options = ServingOptions(format=args.format, max_batch=args.max_batch, instances=args.instances,
                                 device=args.device, queue_delay_us=args.queue_delay_us,
                                 tensorrt_accelerator=args.tensorrt_accelerator, fp16=args.fp16,
                                 warmup=not args.no_warmup, intra_op_threads=args.threads)
        result = convert(args.run_dir, args.repository, args.name, options, keep=args.keep, plan=args.plan,
                         timing_cache=args.timing_cache)
    except (ValueError, TensorRTMissing, TensorRTBuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(result, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
