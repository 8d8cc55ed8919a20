"""Each role's extra installs what its commands need, and nothing of PyTorch: the working tree is built
as a wheel and installed, as a user would, into empty venvs with ``pip install 'WHEEL[serve]'`` and
``'WHEEL[client]'`` (from the package registry or pip's cache; about two minutes on 2 cores). Run
in a folder outside the repository, so only what pip installed is importable: the gateway and the
converter start from the serve venv, which has no torch; the client commands from the client venv,
which has neither torch nor ONNX Runtime; and a model converted and served from the serve venv
answers `clients.predict` from the client venv over gRPC and HTTP."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from gateway_support import image_bytes
from PIL import Image

from benchmarks.footprint import build_wheel, probe_module, role_venv, start_gateway, stop
from benchmarks.soak import wait_http_ready

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def serve_python(tmp_path_factory, wheel) -> Path:
    return role_venv(tmp_path_factory.mktemp("venvs") / "serve", [f"{wheel}[serve]"])


@pytest.fixture(scope="module")
def client_python(tmp_path_factory, wheel) -> Path:
    return role_venv(tmp_path_factory.mktemp("venvs") / "client", [f"{wheel}[client]"])


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def importable(python: Path, names: list[str], cwd: Path) -> list[str]:
    """Those of ``names`` the venv of ``python`` can import (found, not imported)."""
    code = "import importlib.util, sys; print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n)))"
    done = run(python, "-c", code, *names, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def assert_help(python: Path, module: str, cwd: Path) -> None:
    got = probe_module(python, module, "--help", cwd=cwd)
    assert got["exit"] == 0, f"python -m {module} --help failed:\n{got['stderr'][-3000:]}"
    assert got["stdout"].startswith(f"usage: python -m {module}"), got["stdout"][:300]


def test_the_serve_install_runs_the_gateway_and_the_converter_without_pytorch(serve_python, tmp_path):
    for module in ("serving.server", "serving.convert"):
        assert_help(serve_python, module, tmp_path)
    wanted = ["parsimony", "serving", "onnxruntime", "onnx", "grpc", "fastapi", "uvicorn", "tritonclient", "PIL"]
    assert importable(serve_python, wanted, tmp_path) == wanted
    assert importable(serve_python, ["torch", "torchvision", "matplotlib"], tmp_path) == []


def test_the_client_install_runs_the_client_commands_without_pytorch_or_onnx_runtime(client_python, tmp_path):
    for module in ("clients.predict", "clients.load"):
        assert_help(client_python, module, tmp_path)
    assert importable(client_python, ["parsimony", "clients", "grpc", "httpx", "PIL", "numpy"], tmp_path) == \
        ["parsimony", "clients", "grpc", "httpx", "PIL", "numpy"]
    banned = ["torch", "torchvision", "onnx", "onnxruntime", "tritonclient", "matplotlib"]
    assert importable(client_python, banned, tmp_path) == []


def test_a_model_converted_and_served_by_the_serve_install_answers_the_client_install(
        serve_python, client_python, exported_run, tmp_path):
    repository = tmp_path / "repository"
    done = run(serve_python, "-m", "serving.convert", str(exported_run), "--repository", str(repository),
               "--name", "scenes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (repository / "scenes" / "1" / "model.onnx").is_file()
    image = tmp_path / "room.png"
    image.write_bytes(image_bytes((32, 48), "PNG", seed=3))
    serve = ["--repository", str(repository), "--model", "scenes"]
    proc, grpc_target, http_url = start_gateway(serve_python, serve, tmp_path, log=tmp_path / "gateway.log")
    try:
        wait_http_ready(http_url, proc, timeout=120)
        for protocol, server in (("grpc", [grpc_target]), ("http", [http_url.removeprefix("http://"), "--http"])):
            out = tmp_path / protocol
            done = run(client_python, "-m", "clients.predict", str(image), "--server", *server, "--model", "scenes",
                       "--out", str(out), cwd=tmp_path)
            assert done.returncode == 0, f"{protocol}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
            assert sorted(p.name for p in out.iterdir()) == [f"room.{task}.png" for task in ("depth", "normal",
                                                                                             "segmentation")]
            for picture in out.iterdir():
                Image.open(picture).verify()
    finally:
        code = stop(proc)
    assert code == 0, (tmp_path / "gateway.log").read_text()[-3000:]
