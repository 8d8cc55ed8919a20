"""`python -m training.demo`: the serving half of `make demo`, from an exported run to answered requests.

    python -m training.run --config configs/demo.yaml             # train, sparsify, compact, export
    python -m training.demo --run runs/demo                        # convert, serve, call, stop

It lives in `training` because it renders its sample image from the run's own data set (which
needs the training side); everything it runs after that is the serving and client commands.

Steps, each printed as it runs and each the command a user would type:

1. ``python -m serving.convert RUN --repository model_repository --name demo --format python`` adds
   the next version of the model to the repository (older ones beyond ``--keep`` are pruned). The
   python format holds ``model.onnx`` too, so the same repository serves from the embedded backend
   and from the CPU ``tritonserver`` (``python -m serving.triton_process model_repository``);
2. a sample image is rendered from the run's own data set (its validation split, at the model's
   input size) to ``RUN/sample.png``;
3. ``python -m serving.server --repository model_repository --model demo`` starts on free ports;
   the demo waits for ``/readyz``;
4. ``python -m clients.predict RUN/sample.png --server HOST:PORT --out RUN/predictions`` writes the
   visualisations and prints every task's summary and the server's per-stage latencies;
5. ``python -m clients.load`` runs a short closed loop at concurrency 4 and prints its latency figures;
6. the server gets SIGTERM, drains and exits 0.

The gateway's log goes to ``RUN/gateway.log``. Anything failing stops the demo with its message.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from parsimony.layout import CONFIG_FILE, ONNX_FILE
from parsimony.manifest import Manifest
from serving.triton_process import free_ports
from training.config import load_yaml

ROOT = Path(__file__).resolve().parent.parent


def step(title: str, cmd: list[str]) -> list[str]:
    """Print ``python -m ...`` as a user would type it; return it to run with this interpreter."""
    print(f"\n== {title}\n$ {shlex.join(cmd)}", flush=True)
    return [sys.executable, *cmd[1:]]


def run(title: str, cmd: list[str]) -> None:
    subprocess.run(step(title, cmd), check=True, cwd=ROOT)


def sample_image(run_dir: Path, index: int = 0) -> Path:
    """A validation image of the run's data set at the model's input size, as PNG."""
    from training.data.registry import DatasetSpec, build_dataset

    config = load_yaml(run_dir / CONFIG_FILE)
    height, width = Manifest.load(run_dir).image_size
    data = config["dataset"]
    spec = DatasetSpec(root=data.get("root"), image_size=(height, width), num_samples=index + 1,
                       seed=config.get("seed", 0), options=dict(data.get("options") or {}))
    dataset, _ = build_dataset(data["name"], "val", spec)
    image = dataset[index]["image"].numpy()  # [3, H, W] in [0, 1]
    path = run_dir / "sample.png"
    Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    return path


def serve(repository: Path, name: str, log_path: Path) -> tuple[subprocess.Popen, int, int]:
    grpc_port, http_port = free_ports(2)
    cmd = ["python", "-m", "serving.server", "--repository", str(repository), "--model", name, "--host", "127.0.0.1",
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--max-batch", "8"]
    argv = step(f"serve (log: {log_path})", cmd)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return process, grpc_port, http_port


def wait_ready(process: subprocess.Popen, grpc_port: int, log_path: Path, timeout: float = 120.0) -> float:
    from clients import Client

    started = time.perf_counter()
    with Client(f"127.0.0.1:{grpc_port}") as client:
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited with code {process.returncode}; its log:\n"
                                   f"{log_path.read_text(errors='replace')[-4000:]}")
            try:
                if client.ready(timeout=1.0):
                    return time.perf_counter() - started
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the gateway was not ready within {timeout:.0f} s; see {log_path}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="an exported training run (default runs/demo)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--name", default="demo", help="the model's name in the repository (default demo)")
    p.add_argument("--keep", type=int, default=3, help="versions kept in the repository (default 3)")
    p.add_argument("--load-seconds", type=float, default=3.0, help="length of the load run (0: skip it)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return demo(build_parser().parse_args(argv))
    except subprocess.CalledProcessError as exc:
        print(f"\nerror: the step `{shlex.join(exc.cmd)}` failed with exit code {exc.returncode} (its output is "
              f"above)", file=sys.stderr)
        return 1


def demo(args: argparse.Namespace) -> int:
    run_dir, repository = args.run, args.repository
    if not (run_dir / ONNX_FILE).is_file():
        print(f"error: {run_dir} has no {ONNX_FILE}; train and export first: "
              f"python -m training.run --config configs/demo.yaml", file=sys.stderr)
        return 2
    run("convert", ["python", "-m", "serving.convert", str(run_dir), "--repository", str(repository),
                    "--name", args.name, "--format", "python", "--keep", str(args.keep)])
    image = sample_image(run_dir)
    print(f"\n== sample image: {image}", flush=True)
    log_path = run_dir / "gateway.log"
    process, grpc_port, http_port = serve(repository, args.name, log_path)
    try:
        seconds = wait_ready(process, grpc_port, log_path)
        print(f"ready after {seconds:.1f} s: gRPC 127.0.0.1:{grpc_port}, HTTP http://127.0.0.1:{http_port} "
              f"(/v1/models, /metrics)", flush=True)
        server = f"127.0.0.1:{grpc_port}"
        run("predict", ["python", "-m", "clients.predict", str(image), "--server", server,
                        "--out", str(run_dir / "predictions")])
        if args.load_seconds > 0:
            run("load", ["python", "-m", "clients.load", "--server", server, "--model", args.name,
                         "--image", str(image), "--concurrency", "4", "--duration", str(args.load_seconds)])
    finally:
        code = stop(process)
        print(f"\n== stopped the gateway (SIGTERM): exit code {code}", flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
