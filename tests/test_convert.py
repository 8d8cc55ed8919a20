"""serving.convert without a Triton server: layout, versions, generated configs, refusals, the
TensorRT parts that need no TensorRT, and the engine-builder Job's script (with a recording trtexec).

The exported runs come from the session fixtures in conftest.py and are only read here.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from parsimony import onnxrt
from parsimony.manifest import load_manifest
from serving import repository as layout
from serving.convert import PRUNER_FILE, convert, label_files, main
from serving.tensorrt_build import BuildSettings, optimization_profile, tensorrt_available, trtexec_args
from serving.triton_config import (
    FORMATS,
    ORT_PARAMETER,
    ConfigError,
    ServingOptions,
    config_io_spec,
    parse_config,
    preferred_batch_sizes,
)

ROOT = Path(__file__).resolve().parent.parent
needs_no_tensorrt = pytest.mark.skipif(tensorrt_available(), reason="checks the error raised without TensorRT")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (hidden staging folders included)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def config_of(repo: Path, name: str):
    return parse_config((repo / name / "config.pbtxt").read_text())


# --- layout and generated config ----------------------------------------------------------------------


def test_the_python_backend_gets_the_projects_onnxruntime_settings(exported_run, tmp_path):
    """The python-backend model cannot import this project: its ONNX Runtime settings travel in the
    config (those of `parsimony.onnxrt`, with --threads), under the prefix the model file restates."""
    repo = tmp_path / "repo"
    assert run_cli(exported_run, "--repository", repo, "--name", "scenes", "--format", "python", "--threads", "2") == 0
    params = {k: v.string_value for k, v in config_of(repo, "scenes").parameters.items()}
    settings = {k[len(ORT_PARAMETER):]: v for k, v in params.items() if k.startswith(ORT_PARAMETER)}
    assert settings == onnxrt.session_settings(threads=2) and settings["intra_op_num_threads"] == "2"
    template = (ROOT / "serving" / "python_backend" / "model.py").read_text()
    assert f'ORT_PARAMETER = "{ORT_PARAMETER}"' in template
    assert f'PRUNER_FILE = "{PRUNER_FILE}"' in template


def test_python_format_layout_config_and_labels(exported_raw_faces_run, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli(exported_raw_faces_run, "--repository", repo, "--name", "faces", "--format", "python",
                   "--max-batch", "4", "--instances", "2") == 0
    version = repo / "faces" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["manifest.json", "model.onnx", "model.py", PRUNER_FILE]
    assert (version / PRUNER_FILE).read_text() == (ROOT / "parsimony" / "onnxrt.py").read_text()
    assert (version / "model.onnx").read_bytes() == (exported_raw_faces_run / "model.onnx").read_bytes()
    assert (version / "manifest.json").read_bytes() == (exported_raw_faces_run / "manifest.json").read_bytes()
    template = ROOT / "serving" / "python_backend" / "model.py"
    assert (version / "model.py").read_text() == template.read_text()

    config = config_of(repo, "faces")
    manifest = load_manifest(exported_raw_faces_run)
    assert (config.name, config.backend, config.platform, config.max_batch_size) == ("faces", "python", "", 4)
    assert config_io_spec(config) == manifest.tensor_spec
    config_io_spec(config).check_against_onnx(version / "model.onnx")
    assert [(g.kind, g.count) for g in config.instance_group] == [(2, 2)]  # KIND_CPU = 2
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 500
    assert config.version_policy.latest.num_versions == 1
    assert sorted(w.batch_size for w in config.model_warmup) == [1, 4]
    assert all(list(w.inputs["image"].dims) == [3, 32, 48] for w in config.model_warmup)
    assert config.parameters["onnx_file"].string_value == "model.onnx"

    by_task = {t["output"]: t for t in manifest.to_dict()["tasks"]}
    labelled = {o.name: o.label_filename for o in config.output if o.label_filename}
    assert set(labelled) == {"segmentation", "attributes"}
    assert (repo / "faces" / labelled["segmentation"]).read_text().splitlines() == by_task["segmentation"]["class_names"]
    assert (repo / "faces" / labelled["attributes"]).read_text().splitlines() == by_task["attributes"]["attribute_names"]


def test_onnx_format_config_agrees_with_graph(exported_raw_run, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli(exported_raw_run, "--repository", repo, "--name", "scenes") == 0
    config = config_of(repo, "scenes")
    assert config.platform == "onnxruntime_onnx" and not config.backend
    assert [g.kind for g in config.instance_group] == [1]  # KIND_GPU
    assert not config.optimization.HasField("execution_accelerators")
    assert sorted(p.name for p in (repo / "scenes" / "1").iterdir()) == ["manifest.json", "model.onnx"]
    spec = config_io_spec(config)
    assert spec.output_names == ("segmentation", "depth", "normal")
    spec.check_against_onnx(repo / "scenes" / "1" / "model.onnx")
    # depth and normal have no labels; segmentation has its class names
    assert {o.name: bool(o.label_filename) for o in config.output} == {
        "segmentation": True, "depth": False, "normal": False}


@pytest.mark.parametrize("fp16, precision", [(False, "FP32"), (True, "FP16")])
def test_onnx_tensorrt_accelerator(exported_run, tmp_path, fp16, precision):
    repo = tmp_path / "repo"
    flags = ["--fp16"] if fp16 else []
    assert run_cli(exported_run, "--repository", repo, "--name", "scenes", "--tensorrt-accelerator", *flags) == 0
    accelerators = config_of(repo, "scenes").optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"]
    assert accelerators[0].parameters["precision_mode"] == precision


def test_config_text_is_what_triton_parses(exported_run, tmp_path):
    """The rendered text round-trips through ModelConfig, and a typo is rejected, not ignored."""
    repo = tmp_path / "repo"
    convert(exported_run, repo, "scenes", ServingOptions(format="python"))
    text = (repo / "scenes" / "config.pbtxt").read_text()
    assert parse_config(text) == config_of(repo, "scenes")
    with pytest.raises(ConfigError, match="max_batch_sise"):
        parse_config(text.replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(ConfigError):
        parse_config(text.replace("KIND_CPU", "KIND_CPUU"))


def test_tensorrt_with_prebuilt_plan(exported_run, tmp_path):
    """The tensorrt_plan config and layout, with a plan built elsewhere (the Job's install step)."""
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"opaque engine bytes")
    repo = tmp_path / "repo"
    assert run_cli(exported_run, "--repository", repo, "--name", "scenes_trt", "--format", "tensorrt",
                   "--plan", plan, "--max-batch", "16") == 0
    version = repo / "scenes_trt" / "1"
    assert (version / "model.plan").read_bytes() == b"opaque engine bytes"
    assert (version / "model.onnx").is_file() and (version / "manifest.json").is_file()
    config = config_of(repo, "scenes_trt")
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 16)
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8, 16]
    config_io_spec(config).check_against_onnx(version / "model.onnx")


@needs_no_tensorrt
def test_tensorrt_missing_is_a_clear_error_and_writes_nothing(exported_run, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert run_cli(exported_run, "--repository", repo, "--name", "scenes", "--format", "tensorrt") == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "--format onnx" in err and "deploy/engine-builder" in err
    assert not repo.exists()


# --- versions ---------------------------------------------------------------------------------------


def test_versions_are_monotonic_and_pruned(exported_run, tmp_path):
    repo = tmp_path / "repo"
    options = ServingOptions(format="python")
    published = [convert(exported_run, repo, "scenes", options).version for _ in range(3)]
    assert published == [1, 2, 3]
    result = convert(exported_run, repo, "scenes", options, keep=2)
    assert (result.version, result.removed) == (4, (1, 2))
    assert layout.versions(repo, "scenes") == [3, 4]
    assert convert(exported_run, repo, "scenes", options, keep=1).version == 5  # never reuses a number
    assert layout.versions(repo, "scenes") == [5]
    assert layout.latest_version(repo, "scenes") == repo / "scenes" / "5"
    read = layout.read_version(repo, "scenes")
    assert (read.version, read.model_dir) == (5, repo / "scenes")
    assert read.io_spec == load_manifest(exported_run).tensor_spec
    assert not [p for p in (repo / "scenes").iterdir() if p.name.startswith(".")]  # no staging left over


def test_version_readers_explain_missing_models(tmp_path):
    with pytest.raises(layout.RepositoryError, match="no version.*serving.convert"):
        layout.latest_version(tmp_path, "absent")
    (tmp_path / "m" / "1").mkdir(parents=True)
    with pytest.raises(layout.RepositoryError, match=r"no version 7 .*\[1\]"):
        layout.version_path(tmp_path, "m", 7)


def test_failed_staging_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with layout.staged_version(tmp_path, "m") as staged:
            (staged.path / "model.onnx").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list((tmp_path / "m").iterdir()) == []


def test_failed_build_leaves_no_model_and_keeps_an_existing_one(tmp_path):
    from serving.convert import _write_model

    def failing_build(folder: Path) -> None:
        (folder / "model.plan").write_bytes(b"partial")
        raise RuntimeError("engine build failed")

    with pytest.raises(RuntimeError, match="engine build failed"):
        _write_model(tmp_path, "new", {"config.pbtxt": 'name: "new"\n'}, failing_build)
    assert not (tmp_path / "new").exists()

    _write_model(tmp_path, "old", {"config.pbtxt": "v1\n"}, lambda folder: (folder / "model.plan").write_text("1"))
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        _write_model(tmp_path, "old", {"config.pbtxt": "v2\n"}, failing_build)
    assert snapshot(tmp_path) == before


def test_concurrent_writers_get_distinct_versions(tmp_path):
    """Both stage at once and would pick version 1; the second rename finds it taken and uses 2."""
    with layout.staged_version(tmp_path, "m") as first, layout.staged_version(tmp_path, "m") as second:
        (first.path / "a").write_text("first")
        (second.path / "b").write_text("second")
    assert {second.final.name, first.final.name} == {"1", "2"}
    assert (first.final / "a").read_text() == "first" and (second.final / "b").read_text() == "second"
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp's 0o700 is widened to what mkdir gives, so a server running as another user can read it
    assert stat.S_IMODE(os.stat(first.final).st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(first.final / "a").st_mode) == 0o666 & ~umask


# --- refusals: a clear error and nothing written --------------------------------------------------------


@pytest.mark.parametrize("name", ["bad/name", ".hidden", "has space", "", "x" * 129, "ends.", "-dash", "é"])
def test_names_triton_would_reject(exported_run, tmp_path, capsys, name):
    repo = tmp_path / "repo"
    assert run_cli(exported_run, "--repository", repo, f"--name={name}") == 2
    assert "model name" in capsys.readouterr().err
    assert not repo.exists()


@pytest.mark.parametrize("flags, message", [
    (["--format", "savedmodel"], "unknown format 'savedmodel'; choose one of"),
    (["--format", "python", "--fp16"], "--fp16 sets TensorRT's precision"),
    (["--fp16"], "--fp16 sets TensorRT's precision"),
    (["--format", "python", "--device", "gpu"], "use --format onnx for GPU"),
    (["--format", "tensorrt", "--device", "cpu"], "runs on gpu only"),
    (["--tensorrt-accelerator", "--device", "cpu"], "--tensorrt-accelerator applies to"),
    (["--format", "python", "--tensorrt-accelerator"], "--tensorrt-accelerator applies to"),
    (["--max-batch", "0"], "--max-batch must be an integer from 1"),
    (["--instances", "0"], "--instances must be an integer from 1"),
    (["--keep", "0"], "--keep must be a positive number"),
    (["--plan", "missing.plan"], "--plan installs a prebuilt TensorRT plan"),
    (["--format", "tensorrt", "--plan", "missing.plan"], "does not exist"),
    (["--threads", "2"], "use it with --format python"),
    (["--timing-cache", "t.cache"], "--timing-cache is for building a plan"),
])
def test_invalid_options(exported_run, tmp_path, capsys, flags, message):
    repo = tmp_path / "repo"
    assert run_cli(exported_run, "--repository", repo, "--name", "m", *flags) == 2
    assert message in capsys.readouterr().err
    assert not repo.exists()


def test_run_without_export(exported_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("model.onnx"))
    repo = tmp_path / "repo"
    assert run_cli(run, "--repository", repo, "--name", "m") == 2
    err = capsys.readouterr().err
    assert "has no export (model.onnx missing)" in err and "python -m training.export" in err
    assert run_cli(tmp_path / "absent", "--repository", repo, "--name", "m") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not repo.exists()


def test_export_that_disagrees_with_its_manifest(exported_run, exported_faces_run, tmp_path, capsys):
    """A manifest from another model: its digest refuses the graph; without a digest (an older
    export) the tensor spec check does, before anything is written."""
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    shutil.copy2(exported_faces_run / "manifest.json", run / "manifest.json")
    assert run_cli(run, "--repository", tmp_path / "repo", "--name", "m") == 2
    assert "is not the graph" in capsys.readouterr().err
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["onnx_sha256"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli(run, "--repository", tmp_path / "repo", "--name", "m") == 2
    assert "does not match the tensor spec" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_existing_model_in_another_format_is_left_alone(exported_run, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert run_cli(exported_run, "--repository", repo, "--name", "scenes", "--format", "python") == 0
    before = snapshot(repo)
    assert run_cli(exported_run, "--repository", repo, "--name", "scenes", "--format", "onnx") == 2
    assert "is served by the python backend" in capsys.readouterr().err
    assert snapshot(repo) == before


# --- TensorRT settings and the engine-builder Job -----------------------------------------------------------


def test_preferred_batch_sizes():
    assert preferred_batch_sizes(1) == []
    assert preferred_batch_sizes(2) == [2]
    assert preferred_batch_sizes(6) == [2, 4, 6]
    assert preferred_batch_sizes(8) == [2, 4, 8]


def test_optimization_profile_and_trtexec_flags(exported_raw_run):
    spec = load_manifest(exported_raw_run).tensor_spec
    assert optimization_profile(spec, 8) == {"image": ((1, 3, 32, 48), (8, 3, 32, 48), (8, 3, 32, 48))}
    args = trtexec_args(spec, BuildSettings(max_batch=4, fp16=True, tf32=False, timing_cache=Path("t.cache")),
                        "m.onnx", "m.plan")
    assert args == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.plan", "--minShapes=image:1x3x32x48",
                    "--optShapes=image:4x3x32x48", "--maxShapes=image:4x3x32x48",
                    "--memPoolSize=workspace:1024M", "--fp16", "--noTF32", "--timingCacheFile=t.cache"]
    with pytest.raises(ValueError, match="max_batch"):
        BuildSettings(max_batch=0)


def test_format_registry_is_consistent():
    assert set(FORMATS) == {"onnx", "tensorrt", "python"}
    for fmt in FORMATS.values():
        assert bool(fmt.platform) != bool(fmt.backend), fmt
        assert fmt.default_device in fmt.devices
        assert ServingOptions(format=fmt.name).device == fmt.default_device


def test_label_files_follow_the_manifest(exported_raw_faces_run):
    files = label_files(load_manifest(exported_raw_faces_run))
    assert set(files) == {"segmentation", "attributes"}
    assert files["attributes"][0] == "attributes_labels.txt"


def test_a_final_graphs_config_has_its_dtypes_and_labels_on_every_channel_output(exported_faces_run, tmp_path):
    """A final graph: uint8 [H, W, 3] pixels in (warm-up included), typed answers out, the class and
    attribute names on each output with one channel per class or attribute."""
    repo = tmp_path / "repo"
    assert run_cli(exported_faces_run, "--repository", repo, "--name", "faces", "--format", "python") == 0
    config = config_of(repo, "faces")
    manifest = load_manifest(exported_faces_run)
    assert config_io_spec(config) == manifest.tensor_spec and manifest.final
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == \
        [("image", "TYPE_UINT8", [32, 48, 3])]
    assert all(list(w.inputs["image"].dims) == [32, 48, 3] and w.inputs["image"].data_type == mc.TYPE_UINT8
               for w in config.model_warmup)
    types = {o.name: mc.DataType.Name(o.data_type) for o in config.output}
    assert (types["segmentation"], types["segmentation_probabilities_fp16"], types["attributes"]) == \
        ("TYPE_UINT8", "TYPE_FP16", "TYPE_FP32")
    labelled = {o.name: o.label_filename for o in config.output if o.label_filename}
    assert labelled == {"segmentation_probabilities": "segmentation_labels.txt",
                        "segmentation_probabilities_fp16": "segmentation_labels.txt",
                        "segmentation_raw": "segmentation_labels.txt", "attributes": "attributes_labels.txt",
                        "attributes_raw": "attributes_labels.txt"}
    by_task = {t.name: t for t in manifest.task_infos}
    for task in ("segmentation", "attributes"):
        assert (repo / "faces" / f"{task}_labels.txt").read_text().splitlines() == list(by_task[task].labels)
    assert label_files(manifest)["attributes"] == ("attributes_labels.txt",
                                                   "".join(f"{n}\n" for n in by_task["attributes"].labels))
