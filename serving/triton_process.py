"""Start the real Triton Inference Server bundled in the ``nvidia-pytriton`` wheel, on loopback.

Tests, benchmarks (`benchmarks.triton`) and people use it to check a model repository against the
server that production runs, without Docker or a GPU. The wheel pins numpy < 2, so it lives in its own virtual environment,
``.venv-triton`` (``make triton-venv``; ``PARSIMONY_TRITON_VENV`` points elsewhere); that
environment also needs onnxruntime, because the python-backend models run ONNX Runtime inside the
server's stub process, which imports from that environment.

    from serving.triton_process import start_tritonserver

    with start_tritonserver(Path("model_repository")) as server:   # returns once the server is ready
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
        ...
    # leaving the block stops the server by its PID (SIGTERM, then SIGKILL of its process group)

From a shell: ``python -m serving.triton_process model_repository`` serves until Ctrl-C. The test
fixtures (``tests/triton_server.py``) add `require_triton`, which skips or fails a test run.

The bundled binary is not runnable in place: it is copied into a writable folder, the python
backend stub for the environment's Python version is put next to the backend, ``LD_LIBRARY_PATH``
starts with that interpreter's libpython folder and then the wheel's bundled libraries, and the
environment's ``bin/`` goes first on ``PATH`` so the stub finds its packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".venv-triton"
VENV_ENV = "PARSIMONY_TRITON_VENV"
SKIP_ENV = "PARSIMONY_SKIP_TRITON"
MAKE_TARGET = "make triton-venv"
_PROBE = (
    "import json, sys, sysconfig; print(json.dumps({'site': sysconfig.get_paths()['purelib'], "
    "'libdir': sysconfig.get_config_var('LIBDIR'), 'version': f'{sys.version_info[0]}.{sys.version_info[1]}'}))"
)


class TritonUnavailable(RuntimeError):
    """The bundled server cannot be found or started; the message says what to install or fix."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of one ``nvidia-pytriton`` installation are."""

    venv: Path
    site_packages: Path
    libdir: Path
    python_version: str

    @property
    def server_dir(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def bundled_libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    @property
    def stub(self) -> Path:
        return self.server_dir / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"

    @classmethod
    def locate(cls, venv: Path | None = None) -> TritonInstall:
        venv = Path(venv or os.environ.get(VENV_ENV) or DEFAULT_VENV)
        python = venv / "bin" / "python"
        if not python.exists():
            raise TritonUnavailable(
                f"no Triton environment at {venv}: create it with `{MAKE_TARGET}` (nvidia-pytriton, "
                f"numpy<2, onnxruntime) or point {VENV_ENV} at one (the test suite skips its Triton tests "
                f"when {SKIP_ENV}=1)"
            )
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, check=True)
        info = json.loads(probe.stdout)
        install = cls(venv, Path(info["site"]), Path(info["libdir"]), info["version"])
        for needed in (install.server_dir / "bin" / "tritonserver", install.stub, install.bundled_libs):
            if not needed.exists():
                raise TritonUnavailable(
                    f"{needed} is missing: {venv} has no complete nvidia-pytriton for Python "
                    f"{install.python_version}; delete {venv} and run `{MAKE_TARGET}` again"
                )
        return install

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(self.libdir), str(self.bundled_libs)]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)  # the stub must import the Triton venv's packages, not ours
        env.pop("PYTHONHOME", None)
        return env


@dataclass
class TritonServer:
    """A running server; ``stop()`` (or leaving the ``with`` block) ends it."""

    process: subprocess.Popen
    grpc_url: str  # host:port, as tritonclient.grpc takes it
    http_url: str  # host:port, as tritonclient.http takes it
    metrics_url: str  # http://host:port/metrics
    log_path: Path
    workdir: Path
    _own_workdir: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the server's PID, wait, then SIGKILL its process group (the python backend stubs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free on 127.0.0.1 (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def prepare_server(install: TritonInstall, workdir: Path) -> Path:
    """A runnable copy of the bundled server under ``workdir`` (the stub added to the backend)."""
    target = Path(workdir) / "tritonserver"
    shutil.copytree(install.server_dir, target, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(install.stub, target / "backends" / "python" / "triton_python_backend_stub")
    return target


def start_tritonserver(
    repository: Path,
    *,
    venv: Path | None = None,
    workdir: Path | None = None,
    ready_timeout: float = 90.0,
    extra_args: tuple[str, ...] = (),
    ports: tuple[int, int, int] | None = None,
) -> TritonServer:
    """Start ``tritonserver`` on ``repository`` bound to 127.0.0.1 with free ports (or ``ports``:
    gRPC, HTTP, metrics, e.g. to restart a server where its clients expect it); return when it is
    ready (every model loaded), or raise `TritonUnavailable` with the end of its log."""
    install = TritonInstall.locate(venv)
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tritonserver-")) if own else Path(workdir)
    server_dir = prepare_server(install, workdir)
    grpc_port, http_port, metrics_port = ports or free_ports(3)
    cmd = [
        str(server_dir / "bin" / "tritonserver"),
        f"--model-repository={Path(repository).resolve()}",
        f"--backend-directory={server_dir / 'backends'}",
        f"--cache-directory={server_dir / 'caches'}",
        "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
        "--http-address=127.0.0.1", f"--http-port={http_port}",
        "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}",
        "--exit-timeout-secs=5",
        *extra_args,
    ]
    log_path = workdir / "tritonserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=install.environment(),
                                   cwd=workdir, start_new_session=True)
    server = TritonServer(process, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}",
                          f"http://127.0.0.1:{metrics_port}/metrics", log_path, workdir, own)
    try:
        _wait_ready(server, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: TritonServer, timeout: float) -> None:
    url = f"http://{server.http_url}/v2/health/ready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise TritonUnavailable(
                f"tritonserver exited with code {server.process.returncode} before it was ready; "
                f"its log ends:\n{server.log_tail()}"
            )
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        time.sleep(0.1)
    raise TritonUnavailable(f"tritonserver was not ready within {timeout:.0f} s; its log ends:\n{server.log_tail()}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serving.triton_process MODEL_REPOSITORY", file=sys.stderr)
        return 2
    with start_tritonserver(Path(args[0])) as server:
        print(f"tritonserver pid {server.pid}: gRPC {server.grpc_url}, HTTP {server.http_url}, "
              f"metrics {server.metrics_url}; log {server.log_path}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
