"""TensorRT without TensorRT: the engine-builder Job's script (a recording trtexec, a failing python3),
its scheduling on the GPU nodes Triton runs on, the NGC release pinned in one place, and the plan
builder against stand-in `tensorrt` modules (a mismatched version, a refused timing cache)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from deploy_support import BASE, DOCKER, ENGINE_BUILDER, OVERLAYS, ROOT, one, render
from gateway_support import hand_built_export
from packaging.requirements import Requirement

from parsimony.manifest import load_manifest
from parsimony.tasks import TaskSpec
from serving import ngc_release, tensorrt_build
from serving.convert import convert
from serving.convert import main as convert_main
from serving.tensorrt_build import (
    BuildSettings,
    TensorRTVersionMismatch,
    build_plan,
    profile_shapes,
    trtexec_args,
)
from serving.triton_config import ENGINE_CACHE_DIR, ServingOptions, parse_config

SCRIPT = ENGINE_BUILDER / "build-engine.sh"


def _fake_trtexec(tmp_path: Path) -> Path:
    """Records its arguments and writes the engine file it was asked for, as trtexec would."""
    script = tmp_path / "trtexec"
    script.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n'
                      'for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n')
    script.chmod(0o755)
    return script


def _script_env(tmp_path: Path, repo: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "REPOSITORY": str(repo), "SOURCE_MODEL": "scenes", "PRECISION": "fp16",
            "WORKSPACE_MIB": "1024", "OUT": str(tmp_path / "work"), "TRTEXEC": str(_fake_trtexec(tmp_path)),
            "ARGS_FILE": str(tmp_path / "args"), **extra}


def _run_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_script_builds_from_the_newest_onnx_version(exported_run, tmp_path):
    repo = tmp_path / "repo"
    options = ServingOptions(format="onnx")
    convert(exported_run, repo, "scenes", options)
    newest = convert(exported_run, repo, "scenes", options).version_dir
    env = _script_env(tmp_path, repo, MAX_BATCH="4")
    done = _run_script(env)
    assert done.returncode == 0, done.stderr
    assert "version 2" in done.stdout
    out = tmp_path / "work"
    assert (out / "export" / "manifest.json").read_bytes() == (newest / "manifest.json").read_bytes()
    spec = load_manifest(newest).tensor_spec
    expected = trtexec_args(spec, BuildSettings(max_batch=4, fp16=True, timing_cache=repo / ".tensorrt-timing.cache"),
                            str(out / "export" / "model.onnx"), str(out / "model.plan"))
    assert (tmp_path / "args").read_text().splitlines() == expected[1:]
    assert (out / "max_batch").read_text().strip() == "4"
    # the Job's second step: install the plan as the next version of a tensorrt_plan model
    assert convert_main([str(out / "export"), "--repository", str(repo), "--name", "scenes_trt", "--format",
                         "tensorrt", "--plan", str(out / "model.plan"), "--max-batch", "4"]) == 0
    assert (repo / "scenes_trt" / "1" / "model.plan").read_text() == "engine\n"

    failed = _run_script({**env, "SOURCE_MODEL": "absent"})
    assert failed.returncode == 1 and "has no version" in failed.stderr


def test_max_batch_follows_the_source_models_config(exported_run, tmp_path):
    repo = tmp_path / "repo"
    convert(exported_run, repo, "scenes", ServingOptions(format="onnx", max_batch=16))
    env = _script_env(tmp_path, repo)
    env.pop("MAX_BATCH", None)
    done = _run_script(env)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert any(a.startswith("--maxShapes=image:16x") for a in args), args
    assert (tmp_path / "work" / "max_batch").read_text().strip() == "16"
    assert _run_script({**env, "MAX_BATCH": "many"}).returncode == 1


def test_a_failing_python3_stops_the_script_before_trtexec(exported_run, tmp_path):
    """With `read < <(python3 ...)` a failing python3 left the shape flags empty and trtexec built a
    batch-1-only plan; now the script stops."""
    repo = tmp_path / "repo"
    convert(exported_run, repo, "scenes", ServingOptions(format="onnx"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    failing = bin_dir / "python3"
    # prints the first flag, then dies: `read` took that line and ignored the exit status
    failing.write_text("#!/bin/sh\necho '--minShapes=image:1x3x32x48'\necho 'python3: broken' >&2\nexit 1\n")
    failing.chmod(0o755)
    env = _script_env(tmp_path, repo, MAX_BATCH="4", PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = _run_script(env)
    assert done.returncode != 0
    assert not (tmp_path / "args").exists(), "trtexec ran without shape flags"
    assert not (tmp_path / "work" / "model.plan").exists()


def test_a_final_graphs_uint8_pixels_get_an_nhwc_profile(tmp_path):
    """A final graph takes uint8 [N, H, W, 3]: the Job's flags, the plan builder's profile and the
    accelerator's shapes all say image:Bx32x48x3."""
    export = hand_built_export(tmp_path / "export", (TaskSpec("depth", "depth", 1),), (32, 48), final=True)
    repo = tmp_path / "repo"
    convert(export, repo, "scenes", ServingOptions(format="onnx", max_batch=4, tensorrt_accelerator=True))
    done = _run_script(_script_env(tmp_path, repo))
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    shapes = ["--minShapes=image:1x32x48x3", "--optShapes=image:4x32x48x3", "--maxShapes=image:4x32x48x3"]
    assert [a for a in args if "Shapes=" in a] == shapes
    spec = load_manifest(export).tensor_spec
    assert tensorrt_build.optimization_profile(spec, 4) == {"image": ((1, 32, 48, 3), (4, 32, 48, 3), (4, 32, 48, 3))}
    params = parse_config((repo / "scenes" / "config.pbtxt").read_text()).optimization.execution_accelerators
    assert params.gpu_execution_accelerator[0].parameters["trt_profile_max_shapes"] == "image:4x32x48x3"


def test_job_installs_what_it_built_with_python3():
    job, = yaml.safe_load_all((ENGINE_BUILDER / "job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    build, = pod["initContainers"]
    install, = pod["containers"]
    assert build["image"] == ngc_release.TENSORRT_IMAGE
    assert build["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "MAX_BATCH" not in {e["name"] for e in build["env"]}  # derived from the model's config
    command = " ".join(install["command"])
    assert "python3 -m serving.convert" in command and not re.search(r"\bpython\b(?!3)", command)
    assert '--max-batch "$(cat /work/max_batch)"' in command and "--format tensorrt" in command
    assert '"python3"' in (DOCKER / "engine-builder.Dockerfile").read_text().split("ENTRYPOINT", 1)[1]


def _scheduling(pod_spec: dict) -> tuple:
    return pod_spec.get("nodeSelector"), pod_spec.get("tolerations")


def test_engine_builder_lands_on_the_gpu_nodes_triton_runs_on():
    job = one(render(ENGINE_BUILDER), "Job", "engine-builder")["spec"]["template"]["spec"]
    triton = one(render(OVERLAYS["gpu"]), "Deployment", "triton")["spec"]["template"]["spec"]
    selector, tolerations = _scheduling(job)
    assert selector and tolerations, "the Job must be scheduled onto GPU nodes"
    assert _scheduling(job) == _scheduling(triton)
    cpu_triton = one(render(OVERLAYS["cpu"]), "Deployment", "triton")["spec"]["template"]["spec"]
    assert _scheduling(cpu_triton) == (None, None)


def test_gpu_rollout_needs_no_extra_gpu_and_keeps_an_engine_cache():
    triton = one(render(OVERLAYS["gpu"]), "Deployment", "triton")
    assert triton["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    container = next(c for c in triton["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert ENGINE_CACHE_DIR in mounts
    volume = next(v for v in triton["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[ENGINE_CACHE_DIR])
    claim = one(render(OVERLAYS["gpu"]), "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["metadata"]["namespace"] == "parsimony"
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 900, "the first engine build needs minutes"


def test_ngc_release_is_pinned_in_one_place():
    triton_images = [c["image"] for d in yaml.safe_load_all((BASE / "triton.yaml").read_text()) if d
                     and d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]]
    assert triton_images == [ngc_release.TRITON_IMAGE]
    dockerfile = (DOCKER / "engine-builder.Dockerfile").read_text()
    assert f"ARG TENSORRT_IMAGE={ngc_release.TENSORRT_IMAGE}\n" in dockerfile
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tensorrt"] == [ngc_release.TENSORRT_REQUIREMENT]
    requirement = Requirement(ngc_release.TENSORRT_REQUIREMENT)
    assert requirement.specifier.contains(ngc_release.TENSORRT_VERSION)
    assert not requirement.specifier.contains("11.0.0")  # what an unpinned extra resolved to
    assert all(ngc_release.NGC_RELEASE in image for image in (ngc_release.TRITON_IMAGE, ngc_release.TENSORRT_IMAGE))


def test_tensorrt_accelerator_builds_once_into_a_persistent_cache(exported_run, tmp_path):
    repo = tmp_path / "repo"
    convert(exported_run, repo, "scenes", ServingOptions(format="onnx", tensorrt_accelerator=True, max_batch=8))
    config = parse_config((repo / "scenes" / "config.pbtxt").read_text())
    params = dict(config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
    spec = load_manifest(repo / "scenes" / "1").tensor_spec
    lo, opt, hi = profile_shapes(spec, 8)
    assert (params["trt_profile_min_shapes"], params["trt_profile_opt_shapes"], params["trt_profile_max_shapes"]) \
        == (lo, opt, hi)
    assert lo.startswith("image:1x") and hi.startswith("image:8x")
    assert params["trt_engine_cache_enable"] == "1" and params["trt_engine_cache_path"] == f"{ENGINE_CACHE_DIR}/scenes"
    assert params["trt_timing_cache_enable"] == "1"
    warmup_batches = {w.batch_size for w in config.model_warmup}
    assert warmup_batches and all(1 <= b <= 8 for b in warmup_batches)  # inside the one profile: no rebuild


# --- the plan builder against stand-in tensorrt modules ---------------------------------------------


class _Config:
    def __init__(self, accept: bool) -> None:
        self.accept, self.flags, self.caches = accept, set(), []

    def set_memory_pool_limit(self, pool, size):
        self.pool = (pool, size)

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def add_optimization_profile(self, profile):
        self.profile = profile

    def create_timing_cache(self, data: bytes):
        return types.SimpleNamespace(data=data, serialize=lambda: b"fresh-cache")

    def set_timing_cache(self, cache, ignore_mismatch):
        self.caches.append(cache.data)
        return self.accept or cache.data == b""


def _fake_tensorrt(version: str, *, accept_cache: bool = True) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace()  # TensorRT 10: no EXPLICIT_BATCH
    trt.BuilderFlag = types.SimpleNamespace(TF32="tf32") if version.startswith("11") else \
        types.SimpleNamespace(FP16="fp16", TF32="tf32")  # TensorRT 11 dropped FP16
    config = _Config(accept_cache)
    builder = types.SimpleNamespace(
        create_network=lambda flags: "network", create_builder_config=lambda: config,
        create_optimization_profile=lambda: types.SimpleNamespace(set_shape=lambda *a: None),
        build_serialized_network=lambda network, cfg: b"plan-bytes", platform_has_fast_fp16=True)
    trt.Builder = lambda logger: builder
    trt.OnnxParser = lambda network, logger: types.SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    trt.config = config
    return trt


@pytest.fixture
def spec(exported_run):
    return load_manifest(exported_run).tensor_spec


def test_a_tensorrt_of_another_release_is_refused_by_name(monkeypatch, spec, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.0.0.5"))
    with pytest.raises(TensorRTVersionMismatch) as err:
        build_plan(tmp_path / "m.onnx", tmp_path / "m.plan", spec, BuildSettings(max_batch=4, fp16=True))
    assert "11.0.0.5" in str(err.value) and ngc_release.TENSORRT_VERSION in str(err.value)
    assert not (tmp_path / "m.plan").exists()


def test_the_pinned_release_builds(monkeypatch, spec, tmp_path):
    trt = _fake_tensorrt(ngc_release.TENSORRT_VERSION + ".18")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    build_plan(tmp_path / "m.onnx", tmp_path / "m.plan", spec, BuildSettings(max_batch=4, fp16=True, timing_cache=cache))
    assert (tmp_path / "m.plan").read_bytes() == b"plan-bytes"
    assert trt.config.flags == {"fp16", "tf32"}
    assert cache.read_bytes() == b"fresh-cache"


def test_a_refused_timing_cache_is_reported_and_kept(monkeypatch, spec, tmp_path, caplog):
    trt = _fake_tensorrt(ngc_release.TENSORRT_VERSION, accept_cache=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"made-on-another-gpu")
    with caplog.at_level(logging.WARNING, logger=tensorrt_build.log.name):
        build_plan(tmp_path / "m.onnx", tmp_path / "m.plan", spec, BuildSettings(max_batch=4, timing_cache=cache))
    assert "refused the timing cache" in caplog.text and str(cache) in caplog.text
    assert cache.read_bytes() == b"made-on-another-gpu"  # not overwritten
    assert trt.config.caches == [b"made-on-another-gpu", b""]  # then built with an empty one
    assert (tmp_path / "m.plan").read_bytes() == b"plan-bytes"
