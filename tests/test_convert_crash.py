"""serving.convert killed with SIGKILL at each of its write steps leaves a repository that the real
tritonserver loads (strict start, and the flags of deploy/k8s/base/triton.yaml: polling, not exiting
on a bad model, ready only when every model is) and that the gateway's reader reads; the next
conversion deletes what the killed one left and publishes the next version.

The converter stops at a named step when ``PARSIMONY_CONVERT_PAUSE_AT`` says so (read once at
start-up), says "paused at STEP" and waits; the test kills it there. A few steps run in the fast
tier; every step of a new model, an existing one and a pruning run are ``slow``. Without Triton
(``.venv-triton``, ``make triton-venv``) the server part fails with that instruction, or skips with
``PARSIMONY_SKIP_TRITON=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from triton_server import TritonUnavailable, require_triton, start_tritonserver

from parsimony.layout import MODEL_CONFIG_FILE
from serving import leftovers as writers
from serving import repository as layout
from serving.convert import PAUSE_ENV, convert, main
from serving.server.models import repository_models
from serving.triton_config import ServingOptions, config_io_spec, parse_config

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ServingOptions(format="python")
LEFTOVER_PREFIXES = (".staging-", ".pruned-", ".tmp-")
NEW_MODEL_STEPS = ("onnx-copied", "model-filled", "model-published")
EXISTING_MODEL_STEPS = ("onnx-copied", "version-filled", "version-published", "labels-written", "config-written")
LEAVE_SOMETHING = {"onnx-copied", "model-filled", "version-filled", "pruning"}  # hidden, until the next convert


def k8s_triton_flags() -> tuple[str, ...]:
    """The flags of the deployment that decide what a damaged repository does to Triton."""
    deployment = next(d for d in yaml.safe_load_all((ROOT / "deploy/k8s/base/triton.yaml").read_text())
                      if d and d.get("kind") == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
    wanted = ("--model-control-mode", "--repository-poll-secs", "--strict-readiness", "--exit-on-error")
    flags = tuple(a for a in container["args"] if a.startswith(wanted))
    assert len(flags) == len(wanted), container["args"]
    return flags


MODES = {"strict": (), "k8s": k8s_triton_flags()}


def kill_at(run: Path, repo: Path, step: str, *flags: str) -> None:
    """Run the converter until it reaches ``step``, then SIGKILL it."""
    env = {**os.environ, PAUSE_ENV: step}
    cmd = [sys.executable, "-m", "serving.convert", str(run), "--repository", str(repo), "--name", "scenes",
           "--format", "python", *flags]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.strip() == f"paused at {step}":
                break
        else:
            pytest.fail(f"the converter ended (status {process.wait()}) without reaching {step}:\n{''.join(seen)}")
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


def leftovers(repo: Path) -> list[Path]:
    found = [p for p in repo.parent.iterdir() if p.name.startswith(f".{repo.name}.")]
    found += [p for p in repo.rglob(".*") if p.name.startswith(LEFTOVER_PREFIXES)]
    return found


def check_gateway_reads(repo: Path, expected: dict[str, int]) -> None:
    """The gateway's view: the models it lists, each version readable and agreeing with its config."""
    assert {name: layout.read_version(repo, name).version for name in repository_models(repo)} == expected
    assert not [p for p in repo.iterdir() if p.is_dir() and p.name.startswith(".")]  # Triton would load it
    for name in expected:
        config = parse_config((repo / name / MODEL_CONFIG_FILE).read_text())
        assert config_io_spec(config) == layout.read_version(repo, name).io_spec
        for output in config.output:
            if output.label_filename:
                assert (repo / name / output.label_filename).is_file()


def check_triton_loads(repo: Path, expected: dict[str, int], mode: str) -> None:
    """Triton starts, becomes ready and serves exactly the expected models at the expected versions.
    (Polling, Triton may report ready before it loads a model written a moment ago: wait for it.)"""
    require_triton()
    try:
        server = start_tritonserver(repo, extra_args=MODES[mode], ready_timeout=60)
    except TritonUnavailable as exc:
        pytest.fail(f"Triton ({mode}) does not load the repository a killed convert left: {exc}")
    try:
        deadline = time.monotonic() + 30
        while (ready := triton_models(server)) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready == expected, server.log_tail()
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop(timeout=8)  # polling, it may be reloading the fresh model, which holds a graceful exit


def triton_models(server) -> dict[str, int]:
    """The models and versions the server reports READY."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        index = json.loads(response.read())
    return {m["name"]: int(m["version"]) for m in index if m.get("state") == "READY"}


@pytest.fixture(scope="module")
def run(exported_run, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("crash") / "run"
    copy.mkdir()
    for name in ("model.onnx", "manifest.json"):
        shutil.copy2(exported_run / name, copy / name)
    return copy


def killed_repository(run: Path, tmp_path: Path, existing: bool, step: str, *flags: str) -> tuple[Path, dict]:
    """A repository whose converter was killed at ``step``; the models and versions it must serve."""
    repo = tmp_path / "repo"
    if existing:
        for _ in range(2):
            convert(run, repo, "scenes", OPTIONS)
    kill_at(run, repo, step, *flags)
    published = step.endswith("-published") or step in ("labels-written", "config-written", "pruning")
    if existing:
        return repo, {"scenes": 3 if published else 2}
    return repo, ({"scenes": 1} if published else {})


def check_next_convert_cleans_up(run: Path, repo: Path, expected: dict[str, int]) -> None:
    assert main([str(run), "--repository", str(repo), "--name", "scenes", "--format", "python"]) == 0
    assert leftovers(repo) == []
    check_gateway_reads(repo, {"scenes": expected.get("scenes", 0) + 1})


@pytest.mark.parametrize("existing, step, modes", [
    (False, "model-filled", ("strict", "k8s")),  # the whole new model assembled, not yet renamed into place
    (True, "version-filled", ("strict",)),       # a staged version inside the model folder
    (True, "labels-written", ("k8s",)),          # the new version published, the config not yet rewritten
])
def test_killed_convert_leaves_a_loadable_repository(run, tmp_path, existing, step, modes):
    repo, expected = killed_repository(run, tmp_path, existing, step)
    check_gateway_reads(repo, expected)
    for mode in modes:
        check_triton_loads(repo, expected, mode)
    check_next_convert_cleans_up(run, repo, expected)


@pytest.mark.slow
@pytest.mark.parametrize("existing, step", [(False, s) for s in NEW_MODEL_STEPS]
                         + [(True, s) for s in EXISTING_MODEL_STEPS] + [(True, "pruning")])
@pytest.mark.parametrize("mode", MODES)
def test_killed_at_every_step(run, tmp_path, existing, step, mode):
    flags = ("--keep", "1") if step == "pruning" else ()
    repo, expected = killed_repository(run, tmp_path, existing, step, *flags)
    check_gateway_reads(repo, expected)
    check_triton_loads(repo, expected, mode)
    assert bool(leftovers(repo)) == (step in LEAVE_SOMETHING)
    check_next_convert_cleans_up(run, repo, expected)


def test_new_model_staged_inside_another_when_next_to_the_repository_is_unusable(run, tmp_path, monkeypatch):
    """Where the repository's parent is another filesystem or read-only (a volume mounted at
    /models), a new model is assembled inside an existing model's folder, which Triton skips."""
    repo = tmp_path / "repo"
    convert(run, repo, "scenes", OPTIONS)
    make_staging = layout._make_staging

    def refuse_parent(parent: Path, prefix: str) -> Path:
        if parent == Path(os.path.realpath(repo.parent)):
            raise PermissionError(f"{parent} is read-only")
        return make_staging(parent, prefix)

    monkeypatch.setattr(layout, "_make_staging", refuse_parent)
    seen = []

    def at_step(step: str) -> None:
        if step == "model-filled":
            staged = [p for p in (repo / "scenes").iterdir() if p.name.startswith(".staging-")]
            assert [sorted(c.name for c in p.iterdir()) for p in staged] == [
                ["1", "config.pbtxt", "segmentation_labels.txt"]]
            check_triton_loads(repo, {"scenes": 1}, "strict")
            seen.append(step)

    layout.on_step(at_step)
    try:
        result = convert(run, repo, "other", OPTIONS)
    finally:
        layout.on_step(None)
    assert seen == ["model-filled"] and result.version_dir == repo / "other" / "1"
    assert leftovers(repo) == []
    check_gateway_reads(repo, {"scenes": 1, "other": 1})


def test_empty_repository_without_a_staging_place_is_refused(run, tmp_path, monkeypatch, capsys):
    def refuse(parent: Path, prefix: str) -> Path:
        raise PermissionError(f"{parent} is read-only")

    monkeypatch.setattr(layout, "_make_staging", refuse)
    repo = tmp_path / "repo"
    assert main([str(run), "--repository", str(repo), "--name", "scenes"]) == 2
    assert "cannot assemble model 'scenes' where Triton does not look" in capsys.readouterr().err
    assert list(repo.iterdir()) == []


def test_only_leftovers_of_dead_writers_are_deleted(tmp_path):
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = writers.host()
    try:
        alive_dir = repo / "m" / f".staging-{sleeper.pid}@{host}.abc"
        dead_dir = repo / "m" / f".staging-{dead.pid}@{host}.abc"
        dead_trash = repo / "m" / f".pruned-{dead.pid}@{host}.3"
        dead_tmp = repo / "m" / f".tmp-{dead.pid}@{host}.xyz"
        dead_sibling = tmp_path / f".repo.staging-{dead.pid}@{host}.abc"
        foreign_young = repo / "m" / ".staging-1@elsewhere.abc"
        foreign_old = repo / "m" / ".staging-1@elsewhere.def"
        for folder in (alive_dir, dead_dir, dead_trash, dead_sibling, foreign_young, foreign_old):
            (folder / "1").mkdir(parents=True)
        dead_tmp.write_text("half a config")
        old = os.stat(foreign_old).st_mtime - writers.STALE_AFTER_S - 60
        os.utime(foreign_old, (old, old))
        removed = layout.clean_leftovers(repo)
        assert sorted(removed) == sorted([dead_dir, dead_trash, dead_tmp, dead_sibling, foreign_old])
        assert alive_dir.is_dir() and foreign_young.is_dir() and (repo / "m" / "1").is_dir()
        assert not any(p.exists() for p in removed)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_existing_model_keeps_its_tensors(run, exported_faces_run, tmp_path, capsys):
    """A version with other outputs would be loaded with the old config (or the old version with the
    new one) in between two writes: refused, nothing written."""
    repo = tmp_path / "repo"
    convert(run, repo, "scenes", OPTIONS)
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert main([str(exported_faces_run), "--repository", str(repo), "--name", "scenes", "--format", "python"]) == 2
    assert "differ from those of model 'scenes'" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
