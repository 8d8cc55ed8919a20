"""serving.convert on damaged exports: every file it reads (manifest.json, model.onnx) is checked at
the boundary; a damaged one ends the command with exit status 2 and one line naming the file and
the field, no traceback, and the repository exactly as it was. metrics.json is not read.

The property test mutates a copy of a real exported run (the session fixtures in conftest.py), of
a final graph (its manifest's ``graph`` section included) and of a raw one; the table of damages
and the messages they give are for each kind of graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.convert import main

ROOT = Path(__file__).resolve().parent.parent
EXPORT_FILES = ("model.onnx", "manifest.json", "metrics.json")
# manifest fields convert reads; damaging any of these must be refused (others are for people)
READ_TOP_LEVEL = ("format_version", "tasks", "io_spec", "input", "model_config", "complexity", "export")
READ_TASK_KEYS = ("name", "kind", "output", "channels", "class_names", "attribute_names")
OTHER_TYPES = (None, True, -1, 1.5, "x", [], {})


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and folder under ``root`` (hidden ones included) and next to it, with contents."""
    entries = {}
    for p in sorted(root.parent.rglob("*")):
        if p.is_relative_to(root) or p.name.startswith(f".{root.name}"):
            entries[str(p.relative_to(root.parent))] = p.read_bytes() if p.is_file() else b"<dir>"
    return entries


def convert_in_process(run: Path, repo: Path) -> tuple[int, str]:
    """``main`` with stderr captured (and the log, which goes to stderr in a real run)."""
    err = io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger("serving").addHandler(handler)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(run), "--repository", str(repo), "--name", "scenes", "--format", "python"])
    finally:
        logging.getLogger("serving").removeHandler(handler)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def base(exported_raw_run, tmp_path_factory) -> Path:
    """``run/`` (a raw graph's export files, with a digest) and ``repo/`` holding version 1 of ``scenes``."""
    return _base(exported_raw_run, tmp_path_factory)


@pytest.fixture(scope="module")
def final_base(exported_run, tmp_path_factory) -> Path:
    """The same of a final graph."""
    return _base(exported_run, tmp_path_factory)


@pytest.fixture(scope="module")
def bases(base, final_base) -> dict[str, Path]:
    return {"raw": base, "final": final_base}


def _base(exported: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validation")
    (root / "run").mkdir()
    for name in EXPORT_FILES:
        shutil.copy2(exported / name, root / "run" / name)
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    digest = hashlib.sha256((root / "run" / "model.onnx").read_bytes()).hexdigest()
    assert manifest.setdefault("onnx_sha256", digest) == digest
    (root / "run" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert convert_in_process(root / "run", root / "repo")[0] == 0
    return root


@contextlib.contextmanager
def workspace(base: Path, existing: bool):
    """A fresh copy of the run, and of the repository (or none: the model is new)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(base / "run", work / "run")
        if existing:
            shutil.copytree(base / "repo", work / "repo")
        yield work / "run", work / "repo"


def key_paths(obj, prefix=()):
    """Every path (tuple of keys and indices) into a JSON value."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from key_paths(value, (*prefix, key))


def read_paths(manifest: dict) -> list[tuple]:
    """Paths of the manifest that convert reads: required sections, everything of the io spec and
    the tasks' fields (names, kinds, outputs, channels, label names)."""
    paths = [(k,) for k in READ_TOP_LEVEL]
    paths += [p for p in key_paths(manifest["io_spec"], ("io_spec",)) if len(p) > 1]
    for i, task in enumerate(manifest["tasks"]):
        paths.append(("tasks", i))
        paths += [p for p in key_paths(task, ("tasks", i)) if len(p) > 2 and p[2] in READ_TASK_KEYS]
    if "graph" in manifest:  # every field but "outputs", whose only value is its default
        paths += [p for p in key_paths(manifest["graph"], ("graph",)) if p != ("graph", "outputs")]
    return paths


def apply(obj, path: tuple, op: str, value=None):
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@st.composite
def manifest_damage(draw, manifest: dict):
    """(path, op, value) that breaks a field convert reads: delete it, or give it another JSON type."""
    path = draw(st.sampled_from(read_paths(manifest)))
    current = manifest
    for key in path:
        current = current[key]
    if draw(st.booleans()):
        return path, "delete", None
    other = [v for v in OTHER_TYPES if type(v) is not type(current)]
    return path, "replace", draw(st.sampled_from(other))


def damaged_bytes(data: bytes, draw) -> bytes:
    if draw(st.booleans()):  # truncated (a trailing newline alone is not damage)
        return data[: draw(st.integers(0, len(data.rstrip()) - 1))]
    at = draw(st.integers(0, len(data) - 1))
    return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), existing=st.booleans())
@pytest.mark.parametrize("graph", ["final", "raw"])
def test_damaged_export_is_refused_and_nothing_is_written(bases, graph, data, existing):
    """Property: any damage to manifest.json or model.onnx (a read field deleted or of another type,
    the file truncated, a byte changed) -> exit 2, an error naming the file, the repository unchanged."""
    target = data.draw(st.sampled_from(["manifest fields", "manifest bytes", "onnx bytes"]))
    with workspace(bases[graph], existing) as (run, repo):
        manifest_path, onnx_path = run / "manifest.json", run / "model.onnx"
        if target == "manifest fields":
            manifest = json.loads(manifest_path.read_text())
            path, op, value = data.draw(manifest_damage(manifest))
            apply(manifest, path, op, value)
            manifest_path.write_text(json.dumps(manifest))
            named = "manifest.json"
        elif target == "manifest bytes":
            manifest_path.write_bytes(damaged_bytes(manifest_path.read_bytes(), data.draw))
            named = "manifest.json"
            if json_still_valid(manifest_path):  # a changed byte inside a string can leave valid JSON
                return
        else:
            onnx_path.write_bytes(damaged_bytes(onnx_path.read_bytes(), data.draw))
            named = "model.onnx"
        repo_before = snapshot(repo)
        code, err = convert_in_process(run, repo)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and named in errors[0], err
        assert "Traceback" not in err
        assert snapshot(repo) == repo_before


def json_still_valid(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return False
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_onnx_of_an_older_export_never_crashes(base, data):
    """Without a digest (older exports) a changed byte may leave a valid graph of the same tensors,
    which is converted; anything else is refused naming model.onnx. Never a traceback."""
    with workspace(base, existing=True) as (run, repo):
        manifest = json.loads((run / "manifest.json").read_text())
        del manifest["onnx_sha256"]
        (run / "manifest.json").write_text(json.dumps(manifest))
        onnx_path = run / "model.onnx"
        onnx_path.write_bytes(damaged_bytes(onnx_path.read_bytes(), data.draw))
        repo_before = snapshot(repo)
        code, err = convert_in_process(run, repo)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert (code, len(errors)) in ((0, 0), (2, 1)) and "Traceback" not in err, err
        if code == 2:
            assert "model.onnx" in errors[0] and snapshot(repo) == repo_before, err


def _drop_output(manifest: dict, name: str) -> None:
    manifest["io_spec"]["outputs"] = [t for t in manifest["io_spec"]["outputs"] if t["name"] != name]
    manifest["graph"]["tensors"] = [t for t in manifest["graph"]["tensors"] if t["name"] != name]


def _tensor(manifest: dict, name: str) -> dict:
    return next(t for t in manifest["graph"]["tensors"] if t["name"] == name)


DAMAGES = {  # graph kind -> (what is done to the manifest, what the error must say)
    "raw": [
        (lambda m: m.update(tasks={"segmentation": {}}), "field 'tasks'"),
        (lambda m: m["tasks"][0].pop("channels"), "tasks.0.channels"),
        (lambda m: m["tasks"][0].update(channels="7"), "tasks.0.channels"),
        (lambda m: m["tasks"][0].update(channels=8), "tasks.0.channels': 8, but io_spec"),
        (lambda m: m["tasks"][0]["class_names"].pop(), "tasks.0.class_names': a segmentation task needs a list of 7"),
        (lambda m: m["tasks"][1].update(kind="height"), "tasks.1.kind"),
        (lambda m: m["tasks"].pop(), "no task describes the outputs ['normal']"),
        (lambda m: m.pop("io_spec"), "io_spec"),
        (lambda m: m["io_spec"]["inputs"][0].update(shape=[-1, 3, 32]), "io_spec"),
        (lambda m: m.update(onnx_sha256="0" * 64), "is not the graph"),
        (lambda m: m.update(onnx_sha256=12), "onnx_sha256"),
        (lambda m: m.update(format_version=True), "format_version"),
    ],
    "final": [
        (lambda m: m["tasks"][0].update(channels=8), "graph.tensors.1': io_spec gives output 'segmentation_probabilities'"),
        (lambda m: m["tasks"][0]["class_names"].pop(), "tasks.0.class_names': a segmentation task needs a list of 7"),
        (lambda m: _tensor(m, "depth").update(field="metres"), "a depth answer has no field 'metres'"),
        (lambda m: _tensor(m, "depth_fp16").update(dtype="float32"), "io_spec gives output 'depth_fp16' dtype and shape"),
        (lambda m: m["graph"]["tensors"].pop(), "no entry describes the outputs ['normal_raw']"),
        (lambda m: _drop_output(m, "depth_fp16"), "task 'depth' has no output for its depth in float16"),
        (lambda m: m["graph"].update(input_dtype="float32"), "io_spec.inputs"),
        (lambda m: m.pop("graph"), "io_spec.inputs"),
    ],
}


@pytest.mark.parametrize("graph, damage, message", [(g, d, m) for g, table in DAMAGES.items() for d, m in table])
def test_damaged_manifest_names_the_field(bases, graph, damage, message):
    with workspace(bases[graph], existing=False) as (run, repo):
        manifest = json.loads((run / "manifest.json").read_text())
        damage(manifest)
        (run / "manifest.json").write_text(json.dumps(manifest))
        code, err = convert_in_process(run, repo)
        assert code == 2 and message in err and "manifest.json" in err, err
        assert not repo.exists()


@pytest.mark.parametrize("cut", [0, 100, -1])
def test_truncated_onnx_is_refused(base, cut):
    with workspace(base, existing=True) as (run, repo):
        onnx_path = run / "model.onnx"
        onnx_path.write_bytes(onnx_path.read_bytes()[:cut])
        before = snapshot(repo)
        code, err = convert_in_process(run, repo)
        assert code == 2 and "model.onnx is not the graph" in err and "onnx_sha256" in err, err
        manifest = json.loads((run / "manifest.json").read_text())
        del manifest["onnx_sha256"]
        (run / "manifest.json").write_text(json.dumps(manifest))
        code, err = convert_in_process(run, repo)
        assert code == 2 and "model.onnx is not a valid ONNX model" in err, err
        assert snapshot(repo) == before


def test_export_without_digest_converts_with_a_warning(base):
    with workspace(base, existing=True) as (run, repo):
        manifest = json.loads((run / "manifest.json").read_text())
        del manifest["onnx_sha256"]
        (run / "manifest.json").write_text(json.dumps(manifest))
        code, err = convert_in_process(run, repo)
        assert code == 0 and "has no onnx_sha256" in err and (repo / "scenes" / "2" / "model.onnx").is_file()


@pytest.mark.parametrize("damage", ["no image_size", "image_size as text", "truncated", "deleted"])
def test_metrics_json_is_not_read(base, damage):
    """convert publishes the graph and its manifest; the run's metrics are not part of it."""
    with workspace(base, existing=False) as (run, repo):
        metrics_path = run / "metrics.json"
        metrics = json.loads(metrics_path.read_text())
        if damage == "no image_size":
            del metrics["image_size"]
        elif damage == "image_size as text":
            metrics["image_size"] = "32x48"
        metrics_path.write_text(json.dumps(metrics)[:20] if damage == "truncated" else json.dumps(metrics))
        if damage == "deleted":
            metrics_path.unlink()
        assert convert_in_process(run, repo)[0] == 0
        assert (repo / "scenes" / "1" / "model.onnx").read_bytes() == (run / "model.onnx").read_bytes()


def test_command_line_prints_one_line_and_no_traceback(base):
    """The real entry point: exit status 2 and a single error line on stderr."""
    with workspace(base, existing=True) as (run, repo):
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["tasks"] = "segmentation"
        (run / "manifest.json").write_text(json.dumps(manifest))
        (run / "model.onnx").write_bytes(b"\x08\x07garbage")
        before = snapshot(repo)
        done = subprocess.run([sys.executable, "-m", "serving.convert", str(run), "--repository", str(repo),
                               "--name", "scenes", "--format", "python"], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert [line for line in done.stderr.splitlines() if line.startswith("error: ")] == done.stderr.splitlines()
        assert "manifest.json" in done.stderr and "tasks" in done.stderr
        assert snapshot(repo) == before
