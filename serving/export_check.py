"""A run's export as serving reads it, checked at the boundary before anything is written.

`load_export(run_dir)` reads ``manifest.json`` (through `parsimony.manifest.Manifest`, which refuses
unreadable or truncated JSON, a missing key, a wrong type, an unknown task kind, naming the field)
and ``model.onnx``, and raises `ConvertError` (or the manifest's `ManifestError`) naming the file,
the field and what was expected for what serving needs beyond that: tasks whose outputs or channels
the tensor spec contradicts, label lists of the wrong length, an ONNX file that does not parse or
does not pass ``onnx.checker``, a graph whose inputs and outputs differ from the tensor spec.
Both kinds of graph are accepted: a raw graph (one output per task, its head's) and a final graph
(the manifest's ``graph`` section: a uint8 ``[N, H, W, 3]`` or float32 ``[N, 3, H, W]`` image input,
and every field of every task's answer as outputs, each of which the section must describe).

The manifest's ``onnx_sha256`` (hex SHA-256 of ``model.onnx``, written by ``training.export``) ties
the graph to the manifest that describes it: a ``model.onnx`` replaced after the export (a failed
re-export, a copy from another run) is refused even when its tensor names and shapes agree. A
manifest without the field (exported by an older parsimony) is still accepted, with a warning, since
the tensor spec check still applies; re-exporting the run records the digest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from parsimony.errors import SpecError
from parsimony.layout import export_files
from parsimony.manifest import Manifest, TaskSection, sha256_file
from parsimony.spec import INPUT_NAME, ModelIOSpec
from parsimony.tasks import RAW, kind
from serving import repository as repo_layout

log = logging.getLogger("serving")
DIGEST_FIELD = "onnx_sha256"
_REEXPORT = "re-export the run with `python -m training.export RUN_DIR`"


class ConvertError(ValueError):
    """The run, the repository or the options cannot be converted; the message says the fix."""


@dataclass(frozen=True)
class ExportedModel:
    """A checked export: the ONNX graph matches the tensor spec (and digest) its manifest records."""

    directory: Path
    onnx_path: Path
    manifest: Manifest
    spec: ModelIOSpec
    onnx_sha256: str  # of the file as checked; a copy must hash the same


def load_export(run_dir: Path) -> ExportedModel:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConvertError(f"run directory {run_dir} does not exist; pass a training.run output folder")
    onnx_path, manifest_path = export_files(run_dir)
    missing = [p.name for p in (onnx_path, manifest_path) if not p.is_file()]
    if missing:
        raise ConvertError(
            f"{run_dir} has no export ({' and '.join(missing)} missing); run `python -m training.export "
            f"{run_dir}` first (training.run does it at the end unless --no-export)"
        )
    manifest = Manifest.load(manifest_path)  # refuses missing keys, wrong types and unknown kinds, naming the field
    spec = _check_spec(manifest, manifest_path)
    if manifest.final:
        _check_final_tasks(manifest, spec, manifest_path)
    else:
        _check_tasks(manifest.tasks, spec, manifest_path)
    digest = _check_digest(onnx_path, manifest.onnx_sha256, manifest_path)
    _check_graph(onnx_path, spec, manifest_path)
    return ExportedModel(run_dir, onnx_path, manifest, spec, digest)


def label_files(manifest: Manifest) -> dict[str, tuple[str, str]]:
    """``{output: (file name, text)}``: the channel names of every task whose kind names them (class
    names, attribute names), for each output with a channel axis: a raw graph's task output; a
    final graph's probability maps, attribute probabilities and raw outputs (one file per task)."""
    files = {}
    for task in manifest.task_infos:
        if task.labels:
            labels = (repo_layout.label_file(task.name if manifest.final else task.output_name),
                      "".join(f"{n}\n" for n in task.labels))
            for output in _channel_outputs(manifest, task):
                files[output] = labels
    return files


def _channel_outputs(manifest: Manifest, task) -> list[str]:
    """The outputs of ``task`` that have one entry per channel (the per-image shape starts with it)."""
    if not manifest.final:
        return [task.output_name]
    size = manifest.image_size
    return [t.name for t in manifest.graph.tensors if t.task == task.name
            and (t.field == RAW or len(task.owner.field_shape(task, t.field, size)) != 2)]


def _check_spec(manifest: Manifest, path: Path) -> ModelIOSpec:
    try:
        spec = manifest.tensor_spec
    except SpecError as exc:
        raise ConvertError(f"{path}: field 'io_spec' is not a valid tensor spec ({exc}); {_REEXPORT}") from None
    image = spec.inputs[0]
    uint8 = manifest.final and manifest.graph.input_dtype == "uint8"
    want = "uint8 [-1, H, W, C] (a final graph's pixels)" if uint8 else "float32 [-1, C, H, W]"
    if spec.input_names != (INPUT_NAME,) or len(image.shape) != 4 or min(image.shape[1:]) < 1 \
            or image.dtype != ("uint8" if uint8 else "float32"):
        raise ConvertError(
            f"{path}: field 'io_spec.inputs' must hold one tensor {INPUT_NAME!r}, {want} with positive sizes, got "
            f"{[t.to_dict() for t in spec.inputs]}; {_REEXPORT}"
        )
    return spec


def _check_final_tasks(manifest: Manifest, spec: ModelIOSpec, path: Path) -> None:
    """A final graph: the graph section describes every output once, with the shape and dtype its
    task's kind gives the field, and offers every field of every task in every dtype it is offered in."""
    outputs = {t.name: t for t in spec.outputs}
    tasks = {t.name: t for t in manifest.task_infos}
    described = {}
    for i, tensor in enumerate(manifest.graph.tensors):
        where = f"{path}: field 'graph.tensors.{i}'"
        task = tasks[tensor.task]  # the manifest checked that it names a task and an output
        if tensor.name in described:
            raise ConvertError(f"{where}: output {tensor.name!r} is described twice; {_REEXPORT}")
        described[tensor.name] = tensor
        want = _expected_output(task, tensor.field, tensor.dtype, manifest.image_size)
        if want is None:
            raise ConvertError(f"{where}: a {task.kind} answer has no field {tensor.field!r} in {tensor.dtype} (its "
                               f"fields: {list(task.owner.field_names)}); {_REEXPORT}")
        got = (outputs[tensor.name].dtype, outputs[tensor.name].shape)
        if got != want:
            raise ConvertError(f"{where}: io_spec gives output {tensor.name!r} dtype and shape {got}, but the "
                               f"{tensor.field} of a {task.kind} task with {task.channels} channel(s) is {want}; "
                               f"{_REEXPORT}")
    if set(outputs) - set(described):
        raise ConvertError(f"{path}: field 'graph.tensors': no entry describes the outputs "
                           f"{sorted(set(outputs) - set(described))} of io_spec; {_REEXPORT}")
    for i, task in enumerate(manifest.tasks):
        _check_labels(task, path, i)
        info = tasks[task.name]
        for field in info.owner.field_names:
            for dtype in info.owner.field_dtypes(info, field):
                if manifest.output_tensor(task.name, field, dtype) is None:
                    raise ConvertError(f"{path}: field 'graph.tensors': task {task.name!r} has no output for its "
                                       f"{field} in {dtype}; {_REEXPORT}")


def _expected_output(task, field: str, dtype: str, size: tuple[int, int]) -> tuple[str, tuple[int, ...]] | None:
    """(dtype, shape) of ``task``'s ``field`` as its kind says a final graph holds it; None if it has no such field."""
    for out in task.owner.graph_outputs(task, size):
        if (out.field, out.dtype) == (field, dtype):
            return out.dtype, out.shape
    return None


def _check_labels(task: TaskSection, path: Path, i: int) -> None:
    names_field = kind(task.kind).labels_key
    names = getattr(task, names_field) if names_field else None
    if names_field and len(names) != task.channels:
        raise ConvertError(f"{path}: field 'tasks.{i}.{names_field}': a {task.kind} task needs a list of "
                           f"{task.channels} names (one per channel), got {names!r:.80}; {_REEXPORT}")


def _check_tasks(tasks: list[TaskSection], spec: ModelIOSpec, path: Path) -> None:
    """What serving needs beyond the manifest's types: one task per output, channels and label names
    that agree with the output's shape."""
    outputs = {t.name: t for t in spec.outputs}
    seen = set()
    for i, task in enumerate(tasks):
        where = f"{path}: field 'tasks.{i}"
        output = task.output
        if output not in outputs or output in seen:
            raise ConvertError(
                f"{where}.output': {output!r} must be one of the outputs {list(outputs)} of io_spec, once; "
                f"{_REEXPORT}"
            )
        seen.add(output)
        shape, channels = outputs[output].shape, task.channels
        if len(shape) < 2 or shape[1] != channels:
            raise ConvertError(f"{where}.channels': {channels}, but io_spec gives output {output!r} the shape "
                               f"{list(shape)}; {_REEXPORT}")
        _check_labels(task, path, i)
    if set(outputs) - seen:
        raise ConvertError(f"{path}: field 'tasks': no task describes the outputs {sorted(set(outputs) - seen)} of "
                           f"io_spec (one task per output); {_REEXPORT}")


def _check_digest(onnx_path: Path, expected: str | None, manifest_path: Path) -> str:
    try:
        actual = sha256_file(onnx_path)
    except OSError as exc:
        raise ConvertError(f"{onnx_path} cannot be read ({exc}); check the file's permissions") from None
    if expected is None:
        log.warning("%s has no %s (an export by an older parsimony): %s is checked against the tensor spec only; "
                    "re-export the run to record the digest", manifest_path, DIGEST_FIELD, onnx_path.name)
    elif actual != expected:
        raise ConvertError(
            f"{onnx_path} is not the graph {manifest_path} describes: field '{DIGEST_FIELD}' records SHA-256 "
            f"{expected[:16]}…, the file hashes to {actual[:16]}… (replaced or damaged after the export); "
            f"{_REEXPORT}"
        )
    return actual


def _check_graph(onnx_path: Path, spec: ModelIOSpec, manifest_path: Path) -> None:
    import onnx  # here: importing it costs a second, and only this check needs it

    try:
        model = onnx.load(str(onnx_path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's file is the same answer
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConvertError(f"{onnx_path} is not a valid ONNX model ({reason}); {_REEXPORT}") from None
    try:
        spec.check_against_onnx(model)
    except ValueError as exc:
        differences = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ConvertError(f"{onnx_path} does not match the tensor spec in {manifest_path} (field 'io_spec'): "
                           f"{differences}; {_REEXPORT}") from None
