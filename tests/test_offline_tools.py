"""`training.compact` and `training.export` on damaged or half-made run directories.

A run directory always holds the previous complete export or the new one: every failure leaves it
byte for byte as it was. Every file the two commands read is checked at the boundary: a damaged
file stops them with one line naming the file (and field), exit status 2, nothing written. The
property tests damage each file of a real small run in the ways files get damaged (a key deleted,
a value of another type, a truncated or corrupted byte stream) and check exactly that.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import training.export.__main__ as export_cli
from parsimony.errors import InputFileError, ManifestError
from parsimony.spec import load_onnx
from training.compact import main as compact_main
from training.compaction import load_compact
from training.export.manifest import load_manifest, manifest_io_spec, verify_onnx_digest

RUN_FILES = ("config.yaml", "metrics.json", "checkpoint-final.pt")
COMPACT_FILES = ("compact/config.json", "compact/model.safetensors", "compact/plan.json")
EXPORT_FILES = ("model.onnx", "manifest.json")


def snapshot(directory: Path) -> dict[str, str]:
    """Every file (hidden ones too) under ``directory`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_run(source: Path, target: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)
    return target


def run_command(main, run: Path, capsys) -> tuple[int, str]:
    """``main([run])`` in process: a bug would raise out of it (a traceback) and fail the test."""
    capsys.readouterr()
    code = main([str(run)])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, damaged: Path) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"one line expected: {err}"
    assert str(damaged) in err, f"the message does not name {damaged}: {err}"


# --- atomic exports ----------------------------------------------------------------------------


@pytest.fixture
def run_copy(exported_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    return run


def test_failed_export_keeps_the_previous_export(run_copy, capsys):
    """A re-export that fails late (here: plan.json is gone) leaves model.onnx and manifest.json."""
    (run_copy / "compact" / "plan.json").unlink()
    before = snapshot(run_copy)
    code, err = run_command(export_cli.main, run_copy, capsys)
    assert_refused(code, err, run_copy / "compact" / "plan.json")
    assert snapshot(run_copy) == before


def test_failed_first_export_writes_nothing(run_copy, capsys):
    for name in ("model.onnx", "manifest.json", "compact/plan.json"):
        (run_copy / name).unlink()
    before = snapshot(run_copy)
    code, err = run_command(export_cli.main, run_copy, capsys)
    assert_refused(code, err, run_copy / "compact" / "plan.json")
    assert snapshot(run_copy) == before and not (run_copy / "model.onnx").exists()


def test_export_failing_after_the_graph_was_written_changes_nothing(run_copy, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ManifestError("injected failure after the ONNX export")

    monkeypatch.setattr(export_cli, "build_manifest", broken)
    before = snapshot(run_copy)
    assert export_cli.main([str(run_copy)]) == 2
    assert snapshot(run_copy) == before  # no new graph, no staging folder left behind


def test_export_that_compacts_first_commits_both_or_neither(run_copy, capsys, monkeypatch):
    shutil.rmtree(run_copy / "compact")
    monkeypatch.setattr(export_cli, "build_manifest", lambda *a, **k: (_ for _ in ()).throw(
        ManifestError("injected")))
    before = snapshot(run_copy)
    assert export_cli.main([str(run_copy)]) == 2
    assert snapshot(run_copy) == before and not (run_copy / "compact").exists()
    monkeypatch.undo()
    assert export_cli.main([str(run_copy)]) == 0
    manifest = load_manifest(run_copy)
    verify_onnx_digest(manifest, run_copy / "model.onnx")
    assert manifest.to_dict()["model_config"] == load_compact(run_copy / "compact").config.to_dict()


def test_failed_compaction_keeps_the_previous_compact_model(run_copy, capsys, monkeypatch):
    import training.compact as compact_cli

    real = compact_cli.save_compact

    def half(model, plan, directory):
        real(model, plan, directory)
        raise InputFileError("injected failure after the files were written")

    monkeypatch.setattr(compact_cli, "save_compact", half)
    before = snapshot(run_copy)
    assert compact_main([str(run_copy), "--round-to", "1"]) == 2
    assert snapshot(run_copy) == before


def test_manifest_records_the_digest_of_its_graph(exported_run):
    manifest = load_manifest(exported_run)
    assert manifest.onnx_sha256 == hashlib.sha256((exported_run / "model.onnx").read_bytes()).hexdigest()
    verify_onnx_digest(manifest, exported_run / "model.onnx")


def test_a_pair_interrupted_between_the_renames_is_detected(run_copy, monkeypatch):
    """A crash between moving model.onnx and manifest.json in leaves a pair readers refuse."""
    real = os.replace

    def crash_on_manifest(src, dst):
        if Path(dst) == run_copy / "manifest.json":
            raise KeyboardInterrupt  # stands in for the process dying here
        real(src, dst)

    old_manifest = load_manifest(run_copy)
    monkeypatch.setattr(export_cli.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        export_cli.export_run(run_copy, opset=16)  # another opset: another graph
    monkeypatch.undo()
    assert load_manifest(run_copy) == old_manifest
    with pytest.raises(ManifestError, match="not the graph its manifest describes"):
        verify_onnx_digest(old_manifest, run_copy / "model.onnx")
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".")]  # staging removed


def test_digest_check_refuses_a_manifest_without_digest(exported_run, tmp_path):
    manifest = load_manifest(exported_run).model_copy(update={"onnx_sha256": None})
    with pytest.raises(ManifestError, match="records no onnx_sha256"):
        verify_onnx_digest(manifest, exported_run / "model.onnx")


# --- damaged inputs: property tests ------------------------------------------------------------

SCALARS = st.sampled_from(["x", "", 7, -1, 0, 1.5, True, None, [], {}])


def _paths(obj, prefix=()) -> list[tuple]:
    """Every key path into nested dicts and lists (the root excluded)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _mutate_tree(tree, path: tuple, op: str, value) -> None:
    parent = functools.reduce(operator.getitem, path[:-1], tree)
    parent.pop(path[-1]) if op == "delete" else parent.__setitem__(path[-1], value)


KINDS = ("delete", "retype", "truncate", "corrupt")
# examples per (file, kind): a few in the fast tier, more under `make test-all`
EXAMPLES = int(os.environ.get("PARSIMONY_PROPERTY_EXAMPLES", "3"))


@st.composite
def damage(draw, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    return kind, draw(st.integers(0, 2**32 - 1)), draw(SCALARS)


def apply_damage(path: Path, kind: str, seed: int, value) -> None:
    rng = random.Random(seed)
    raw = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(raw[: rng.randrange(len(raw))])
        return
    if kind == "corrupt":
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
        return
    if path.suffix == ".safetensors" or path.suffix == ".onnx":  # no tree: corrupt instead
        apply_damage(path, "corrupt", seed, value)
        return
    if path.suffix == ".pt":
        tree = torch.load(path, map_location="cpu", weights_only=True)
        candidates = [p for p in _paths(tree) if p[0] != "states" or (len(p) <= 3 and p[:2] == ("states", "model"))]
        target = rng.choice(candidates)
        _mutate_tree(tree, target, "delete" if kind == "delete" else "set", value)
        torch.save(tree, path)
        return
    load, dump = (yaml.safe_load, yaml.safe_dump) if path.suffix == ".yaml" else (json.loads, json.dumps)
    tree = load(path.read_text())
    target = rng.choice(_paths(tree))
    _mutate_tree(tree, target, "delete" if kind == "delete" else "set", value)
    path.write_text(dump(tree))


def check_damaged_run(source: Path, names: tuple[str, ...], damaged: str, main, capsys, how) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_run(source, Path(tmp) / "run", names)
        apply_damage(run / damaged, *how)
        before = snapshot(run)
        code, err = run_command(main, run, capsys)
        if code == 2:
            assert_refused(code, err, run / damaged)
            assert snapshot(run) == before
        else:  # the damage left a valid file (e.g. an optional key deleted): a complete result
            assert code == 0, err
            if main is export_cli.main:
                verify_onnx_digest(load_manifest(run), run / "model.onnx")
            load_compact(run / "compact")


PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damaged", RUN_FILES)
@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), value=SCALARS)
def test_compact_refuses_any_damaged_run_file(exported_run, capsys, damaged, kind, seed, value):
    check_damaged_run(exported_run, RUN_FILES, damaged, compact_main, capsys, (kind, seed, value))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damaged", COMPACT_FILES + ("metrics.json",))
@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), value=SCALARS)
def test_export_refuses_any_damaged_input(exported_run, capsys, damaged, kind, seed, value):
    check_damaged_run(exported_run, RUN_FILES + COMPACT_FILES + EXPORT_FILES, damaged, export_cli.main, capsys,
                      (kind, seed, value))


@settings(max_examples=10 * EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=damage())
def test_manifest_reader_refuses_any_damaged_manifest(exported_run, how):
    """Readers (serving.convert, the gateway) get a ManifestError naming the file, or a manifest
    whose every field they use is valid."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.json"
        shutil.copy2(exported_run / "manifest.json", path)
        apply_damage(path, *how)
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            assert str(path) in str(exc)
            return
        spec = manifest_io_spec(manifest)
        assert all(t.output in spec.output_names for t in manifest.tasks)
        assert [int(x) for x in manifest.input.size] == manifest.input.size


@settings(max_examples=5 * EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=damage(kinds=("truncate", "corrupt")))
def test_any_change_to_the_graph_is_caught(exported_run, how):
    """Damaged ONNX bytes: unreadable ones are refused naming the file; any change at all fails the
    digest check against the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        shutil.copy2(exported_run / "model.onnx", path)
        apply_damage(path, *how)
        if path.read_bytes() == (exported_run / "model.onnx").read_bytes():
            return
        with pytest.raises(ManifestError, match="not the graph its manifest describes"):
            verify_onnx_digest(load_manifest(exported_run), path)
        try:
            manifest_io_spec(load_manifest(exported_run)).check_against_onnx(path)
        except InputFileError as exc:
            assert str(path) in str(exc)
        except ValueError as exc:  # readable, but no longer the spec's graph
            assert "does not match the tensor spec" in str(exc)


def test_load_onnx_names_a_missing_file(tmp_path):
    with pytest.raises(InputFileError, match=r"model.onnx: ONNX model not found"):
        load_onnx(tmp_path / "model.onnx")
