"""The prediction gateway against in-process ONNX Runtime, side by side, on the same model and machine.

    python -m benchmarks.gateway                      # demo and resnet50d-os8 at full size (slow: minutes)
    python -m benchmarks.gateway --quick              # tiny sizes, short runs: a smoke test
    python -m benchmarks.gateway --markdown docs/BENCHMARKS.md --json gateway.json

Models (as in `benchmarks.compaction`): ``demo`` (``tiny`` encoder, light heads, 96x128) and
``resnet50d-os8`` (dilated ResNet-50-D, ASPP heads, 288x384), with the synthetic-scenes tasks
(segmentation with 7 classes, depth, normals, edges), untrained, 50 % of the encoder's channels
zeroed at random and compacted (round_to 8), exported with its manifest into a model repository:
the final graph (uint8 pixels in, each task's answer out), or with ``--raw-outputs`` the raw graph
(float32 images in, logits out, post-processed by the gateway). In-process ONNX Runtime runs the
same graph as the gateway: the final graph pruned to the outputs the gateway asks for by default
(`parsimony.onnxrt.session(..., outputs=...)`), the raw graph whole.

For each model, first in this process with nothing else running:

- **ORT's best batched configuration**: images/s of ``session.run`` at batch 1, 2, 4, 8 and 16, with
  each spinning mode; the fastest is re-measured below, next to the gateway;
- **decode**: PIL decoding of the image as PNG and as JPEG (quality 90) plus what the gateway does to
  the pixels (`serving.server.codec.model_input`: nothing for a final graph, ``x / 255`` for a raw one).

Then with the gateway (`python -m serving.server`, a subprocess, same ONNX Runtime thread count)
running, over gRPC from this process:

- **p50 at batch 1**, in ``--rounds`` alternating rounds (so that drift in the machine's load hits
  both sides alike): in-process ``session.run`` on one image as the graph takes it, and sequential
  gateway Predict calls with a raw ``uint8 [H, W, 3]`` tensor (no decode; everything the gateway does
  around the forward pass included; client-measured round trip, next to the server's
  own stage timings). A second gateway series sends PNG bytes, whose server ``decode_ms`` is
  reported separately. The idle gateway takes no CPU while ORT runs (its threads stop spinning
  when a forward pass returns);
- **gateway throughput, concurrency 16**, in ``--rounds`` rounds alternating with ORT's best
  configuration in process: 16 concurrent callers (one grpc.aio channel) send raw tensors back to
  back; images/s over the measured windows and the mean batch size the dynamic batcher formed
  (``--max-queue-delay-ms 0``; ``--max-batch`` set to the batch size at which ONNX Runtime was
  fastest in process, as an operator would tune it, unless ``--max-batch`` is given); then the same
  with h2load, a C client, as the load generator (see `benchmarks._gateway_bounds`).
- **gRPC floor**: the same calls against a no-op grpc.aio server that answers with the gateway's
  response bytes: what the loopback and Python gRPC on both ends cost, which no Python gateway
  avoids; the gateway's own share is its p50 minus this floor.

ONNX Runtime's latency is compared like for like: its threads spin exactly when the gateway's do
(``--ort-spinning``, default ``run``: within a forward pass only, see `serving.server.backend`); its
best batched throughput is the best of the spinning modes. With h2load installed, `benchmarks._gateway_bounds`
adds what no Python gRPC front end can beat here (``--no-h2load`` skips it).

Targets: gateway p50 <= 1.05 x ORT p50; gateway throughput >= 0.9 x ORT's best batched
throughput. Client and server share the machine's cores, as they would on one node.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from PIL import Image

from benchmarks._final_models import call_outputs, graph_input, metadata
from benchmarks._gateway_bounds import INSTALL_HINT, ceilings, echo_server, h2load_available, h2load_run
from benchmarks._gateway_report import report, update_markdown
from benchmarks._timing import configure_logging
from benchmarks.compaction import CASES, sparsify
from parsimony import onnxrt
from parsimony.io import atomic_write_json
from parsimony.layout import MANIFEST_FILE, ONNX_FILE
from parsimony.wire import STAGE_FIELDS
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.proto.parsimony.v1 import gateway_pb2_grpc as pb_grpc
from serving.server.codec import model_input
from serving.server.config import default
from serving.server.metadata import ModelMetadata
from training.timing import median_ms, sample_ms

log = logging.getLogger("benchmarks.gateway")
ROOT = Path(__file__).resolve().parents[1]
P50_TARGET, THROUGHPUT_TARGET = 1.05, 0.9
ORT_BATCHES = (1, 2, 4, 8, 16)


# --- the model ------------------------------------------------------------------------------------


def prepare_model(key: str, size: tuple[int, int], repo: Path, seed: int, raw_outputs: bool = False) -> Path:
    """Build, sparsify (50 %), compact and export ``key`` into ``repo/key/1`` (the final graph, or the
    raw one); returns the version folder."""
    import torch

    from training.compaction import compact
    from training.data.synthetic_scenes import TASKS
    from training.export import build_manifest, export_onnx
    from training.models import create_model

    torch.manual_seed(0)
    dense = create_model(encoder=CASES[key].encoder, tasks=TASKS).eval()
    small, _ = compact(sparsify(dense, 50, seed), round_to=8)
    version = repo / key / "1"
    version.mkdir(parents=True)
    report = export_onnx(small, version / ONNX_FILE, image_size=size, check_batch_sizes=(1,), raw_outputs=raw_outputs)
    build_manifest(small, report.io_spec, image_size=size, report=report,
                   extra={"benchmark": "benchmarks.gateway", "sparsity": 50, "round_to": 8}).write(version / MANIFEST_FILE)
    return version


def test_image(size: tuple[int, int]) -> np.ndarray:
    """A smooth synthetic RGB image (compresses like a photo, unlike noise)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([np.sin(x / 7) + np.cos(y / 5), np.sin((x + y) / 9), np.cos(x / 11 - y / 13)], axis=-1)
    return ((rgb - rgb.min()) / np.ptp(rgb) * 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --- in-process ONNX Runtime ----------------------------------------------------------------------


def ort_sessions(onnx_path: Path, threads: int, outputs: list[str] | None) -> dict[str, ort.InferenceSession]:
    """ONNX Runtime with each spinning mode of the gateway's (`parsimony.onnxrt.SPINNING`), configured
    as the gateway configures its own: latency is compared with the gateway's mode, throughput with the best.
    ``outputs``: the graph pruned to the outputs the gateway asks for (a final graph's answers)."""
    return {mode: onnxrt.session(onnx_path, threads=threads, spinning=mode, outputs=outputs) for mode in onnxrt.SPINNING}


def ort_throughput(sessions: dict[str, ort.InferenceSession], x: np.ndarray, args) -> dict:
    """Images/s at each batch size of `ORT_BATCHES`, for every session; the best of all."""
    by_spinning = {}
    for spinning, session in sessions.items():
        throughput = {}
        for batch in ORT_BATCHES:
            xb = np.repeat(x, batch, axis=0)
            ms = median_ms(lambda xb=xb, s=session: s.run(None, {"image": xb}), repeats=3, min_time=args.seconds / 2)
            throughput[batch] = batch / (ms / 1e3)
        by_spinning[spinning] = throughput
    spinning, batch = max(((k, b) for k, t in by_spinning.items() for b in t), key=lambda kb: by_spinning[kb[0]][kb[1]])
    return {"best_throughput": by_spinning[spinning][batch], "best_batch": batch, "throughput_spinning": spinning,
            "throughput": by_spinning}


def decode_ms(image: np.ndarray, meta: ModelMetadata, args) -> dict[str, float]:
    """In-process PIL decode of the image as PNG and as JPEG, and what the gateway does to the pixels."""
    out = {}
    for fmt in ("PNG", "JPEG"):
        data = encode(image, fmt)
        out[fmt] = median_ms(lambda d=data: model_input(np.asarray(Image.open(io.BytesIO(d))), meta),
                             repeats=max(args.calls, 20), min_time=0.2)
    return out


# --- the gateway ----------------------------------------------------------------------------------


def start_gateway(repo: Path, name: str, threads: int, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "serving.server", "--repository", str(repo), "--model", name, "--host", "127.0.0.1",
           "--grpc-port", "0", "--http-port", "0", "--threads", str(threads), "--max-batch", str(max_batch),
           "--max-queue-delay-ms", "0", "--poll-interval-s", "0", "--log-level", "INFO", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r"ready: .* gRPC on [^ ]+:(\d+)", line)
        if found:
            return proc, int(found.group(1))
    raise RuntimeError("the gateway exited before it was ready:\n" + "".join(lines))


def stop_gateway(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def tensor_request(name: str, image: np.ndarray) -> pb.PredictRequest:
    return pb.PredictRequest(model=name, tensor=pb.Tensor(dtype=pb.UINT8, shape=image.shape, data=image.tobytes()))


def measure_latency(port: int, request: pb.PredictRequest, args) -> dict:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        responses: list[pb.PredictResponse] = []
        times = sample_ms(lambda: responses.append(stub.Predict(request)), repeats=args.calls, min_time=args.seconds)
    return {"p50_ms": statistics.median(times), "server_ms": _stages(responses)}


def alternating_latency(port: int, request: pb.PredictRequest, sessions: dict, x: np.ndarray, args) -> tuple[dict, dict]:
    """p50 at batch 1 of in-process ONNX Runtime (with the gateway's spinning mode, like for like) and
    of the gateway, measured in ``args.rounds`` alternating rounds so that drift in the machine's load
    hits both alike."""
    session, ort_times = sessions[args.ort_spinning], []
    gateway_times: list[float] = []
    responses: list[pb.PredictResponse] = []
    per_round = dict(repeats=max(1, args.calls // args.rounds), min_time=args.seconds / args.rounds)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        for _ in range(args.rounds):
            ort_times += sample_ms(lambda: session.run(None, {"image": x}), **per_round)
            gateway_times += sample_ms(lambda: responses.append(stub.Predict(request)), **per_round)
    return ({"p50_ms": statistics.median(ort_times), "p50_spinning": args.ort_spinning},
            {"p50_ms": statistics.median(gateway_times), "server_ms": _stages(responses)})


def _stages(responses: list[pb.PredictResponse]) -> dict[str, float]:
    return {f: statistics.median([getattr(r.timings, f) for r in responses])
            for f in STAGE_FIELDS}


async def _throughput(port: int, request: pb.PredictRequest, concurrency: int, seconds: float,
                      warmup: bool = True) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        if warmup:
            await asyncio.gather(*(stub.Predict(request) for _ in range(concurrency)))
        done, batches = 0, []
        start = time.perf_counter()
        until = start + seconds

        async def caller() -> None:
            nonlocal done
            rounds = 0
            while time.perf_counter() < until or rounds < 1:
                response = await stub.Predict(request)
                batches.append(response.timings.batch_size)
                done, rounds = done + 1, rounds + 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"images_per_s": done / elapsed, "requests": done, "seconds": elapsed, "mean_batch": statistics.fmean(batches)}


def alternating_throughput(port: int, request: pb.PredictRequest, session: ort.InferenceSession, xb: np.ndarray,
                           args) -> tuple[float, dict]:
    """ORT at its best batch ``xb`` and the gateway at ``--concurrency``, in ``args.rounds`` alternating
    rounds (drift in the machine's speed hits both alike; re-measuring the best configuration also
    drops the bias of having picked it as the best of ten noisy figures): (ORT images/s, gateway)."""
    ort_seconds, ort_images, rounds = 0.0, 0, []
    for _ in range(args.rounds):
        times = sample_ms(lambda: session.run(None, {"image": xb}), repeats=2, warmup=1, min_time=args.seconds / args.rounds)
        ort_seconds, ort_images = ort_seconds + sum(times) / 1e3, ort_images + len(times) * len(xb)
        rounds.append(asyncio.run(_throughput(port, request, args.concurrency, args.seconds / args.rounds,
                                              warmup=not rounds)))
    requests, seconds = sum(r["requests"] for r in rounds), sum(r["seconds"] for r in rounds)
    mean_batch = sum(r["mean_batch"] * r["requests"] for r in rounds) / requests
    return ort_images / ort_seconds, {"images_per_s": requests / seconds, "requests": requests, "mean_batch": mean_batch}


def measure(repo: Path, name: str, image: np.ndarray, version: Path, args) -> tuple[dict, dict]:
    """In-process ONNX Runtime and the gateway on the same model: (ORT results, gateway results)."""
    meta = metadata(version, name)
    x = graph_input(meta, image[None])
    sessions = ort_sessions(version / ONNX_FILE, args.threads, list(call_outputs(meta)) if meta.final else None)
    ort_result = {**ort_throughput(sessions, x, args), "decode_ms": decode_ms(image, meta, args)}
    max_batch = args.max_batch or ort_result["best_batch"]
    extra = ["--ort-spinning", args.ort_spinning]
    proc, port = start_gateway(repo, name, args.threads, max_batch, extra)
    request = tensor_request(name, image)
    try:
        ort_latency, tensor = alternating_latency(port, request, sessions, x, args)
        png = measure_latency(port, pb.PredictRequest(model=name, encoded_image=encode(image, "PNG")), args)
        best_session, xb = sessions[ort_result["throughput_spinning"]], np.repeat(x, ort_result["best_batch"], axis=0)
        ort_result["sweep_best_throughput"] = ort_result["best_throughput"]
        ort_result["best_throughput"], throughput = alternating_throughput(port, request, best_session, xb, args)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            canned = pb_grpc.PredictionServiceStub(channel).Predict(request).SerializeToString()
        c_client = (h2load_run(port, request.SerializeToString(), concurrency=args.concurrency,
                               seconds=args.seconds, pid=proc.pid, response_bytes=len(canned) // 2) if args.h2load else None)
    finally:
        stop_gateway(proc)
    gateway = {"max_batch": max_batch, "tensor": tensor, "png": png, "throughput": throughput,
               "throughput_c_client": c_client, "floor": measure_floor(canned, request, args)}
    return {**ort_result, **ort_latency}, gateway


def measure_floor(response: bytes, request: pb.PredictRequest, args) -> dict:
    """The same calls against a no-op grpc.aio server that answers every Predict with ``response``'s
    bytes (no parsing, no model): what Python gRPC and the loopback cost on both ends, a floor that
    any Python gateway pays on top of the forward pass."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=echo_server, args=(response, ports), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        latency = measure_latency(port, request, args)
        throughput = asyncio.run(_throughput(port, request, args.concurrency, args.seconds))
        c_client = {}
        if args.h2load:  # the no-op server's own round trip and CPU per call, with a client that costs ~nothing
            for concurrency in (1, args.concurrency):
                c_client[concurrency] = h2load_run(port, request.SerializeToString(), concurrency=concurrency,
                                                   seconds=args.seconds / 2, pid=server.pid, response_bytes=len(response) // 2)
    finally:
        server.terminate()
        server.join(30)
    return {"p50_ms": latency["p50_ms"], "requests_per_s": throughput["images_per_s"],
            "c_client": {str(k): v for k, v in c_client.items()}}


# --- report ---------------------------------------------------------------------------------------


def run_model(key: str, args) -> dict:
    size = CASES[key].quick_size if args.quick else CASES[key].image_size
    image = test_image(size)
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        repo = Path(tmp)
        version = prepare_model(key, size, repo, args.seed, args.raw_outputs)
        log.info("%s %dx%d: exported; measuring ONNX Runtime in process, the gateway and the gRPC floor", key, *size)
        ort_result, gateway = measure(repo, key, image, version, args)
    ort_p50, gw_p50, floor = ort_result["p50_ms"], gateway["tensor"]["p50_ms"], gateway["floor"]["p50_ms"]
    best = ort_result["best_throughput"]
    ratios = {"p50": gw_p50 / ort_p50, "p50_without_transport": (gw_p50 - floor) / ort_p50,
              "throughput": gateway["throughput"]["images_per_s"] / best}
    bounds = None
    if args.h2load:
        c_client = gateway["floor"]["c_client"]
        bounds = ceilings(ort_p50_ms=ort_p50, ort_best_per_s=best, cores=len(os.sched_getaffinity(0)),
                          noop_latency_ms=c_client["1"]["p50_ms"],
                          noop_cpu_ms=c_client[str(args.concurrency)]["server_cpu_ms_per_call"])
        ratios["throughput_c_client"] = gateway["throughput_c_client"]["requests_per_s"] / best
    return {"bounds": bounds, "model": key, "case": CASES[key].name, "image_size": list(size), "ort": ort_result, "gateway": gateway,
            "ratios": ratios, "p50_met": ratios["p50"] <= P50_TARGET,
            "throughput_met": ratios["throughput"] >= THROUGHPUT_TARGET}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--quick", action="store_true", help="tiny image sizes and short runs: a smoke test")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ORT intra-op threads (both sides)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--calls", type=int, default=None, help="at least this many timed calls per latency (default 20; quick 5)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the gateway's --max-batch (default: the batch size with ONNX Runtime's best throughput)")
    p.add_argument("--seconds", type=float, default=None, help="at least this long per measurement (default 10; quick 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating rounds of ORT and the gateway, for latency and for throughput (default 6; quick 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the zeroed channels")
    p.add_argument("--raw-outputs", action="store_true",
                   help="serve the raw graph (float32 input, post-processed by the gateway) instead of the final one")
    p.add_argument("--ort-spinning", choices=list(onnxrt.SPINNING), default=default("ort_spinning"),
                   help=f"the gateway's --ort-spinning, and ORT's in process for the latency "
                        f"(default {default('ort_spinning')}, the gateway's)")
    p.add_argument("--no-h2load", dest="h2load", action="store_false",
                   help=f"skip the measurements with h2load, a C load generator ({INSTALL_HINT}): the no-op server's "
                        f"own cost, the ceilings it implies, and the gateway's throughput without a Python client")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--markdown", help="write the table into this file's gateway section (e.g. docs/BENCHMARKS.md)")
    args = p.parse_args(argv)
    args.calls = args.calls if args.calls is not None else (5 if args.quick else 20)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 10.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 6)
    if args.h2load and not h2load_available():
        p.error(f"h2load is not installed ({INSTALL_HINT}), or pass --no-h2load")
    if min(args.calls, args.rounds, args.concurrency, args.threads) < 1 or args.seconds <= 0:
        p.error("--calls, --rounds, --concurrency and --threads must be positive, --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    env = {"onnxruntime": ort.__version__, "threads": args.threads, "cores": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    results = [run_model(key, args) for key in args.models]
    text = report(results, args, env)
    print(text)
    if args.markdown:
        update_markdown(Path(args.markdown), text)
    if args.json:
        atomic_write_json(Path(args.json), {"env": env, "args": vars(args), "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
