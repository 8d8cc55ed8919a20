"""The gateway in front of Triton against calling Triton directly, and the load tool's figures.

    python -m benchmarks.triton_gateway                  # full measurement (about 4 minutes)
    python -m benchmarks.triton_gateway --quick          # a smoke test
    python -m benchmarks.triton_gateway --json out.json  # also the raw figures

One run, one model (the demo's, as `benchmarks.triton` builds it: tiny encoder, 96x128, half its
encoder channels removed), one repository converted with ``--format python`` (ONNX Runtime inside
Triton's python backend, one CPU instance, dynamic batching up to 8), and three servers on loopback:
the real ``tritonserver`` (nvidia-pytriton), a gateway with ``--backend triton`` in front of it, and
a gateway with the embedded ONNX Runtime backend. Everything shares this machine's cores.

1. **Added latency of the gateway** (batch 1, one request at a time): *direct* is tritonclient's
   gRPC ``infer`` with the preprocessed float32 tensor, every output requested and read into numpy;
   *gateway* is `clients.Client.predict` over gRPC with the raw uint8 image (the gateway converts
   it, batches it, calls Triton, post-processes every task and answers; no image decode on either
   side). The two alternate in rounds (reversed order every other round) so that drift in the
   machine's load hits both alike; p50 and p99 pool every request. The difference is what the
   gateway adds: a second gRPC hop, its batcher and the typed post-processing.
2. **The load tool** (`clients.loadgen.run_load`, closed loop) against the embedded gateway at
   concurrency 1, 4 and 16, and against the Triton gateway at the same concurrencies, for
   ``--seconds`` each: throughput, client-side p50/p90/p99/max, errors by code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from benchmarks.gateway import start_gateway, stop_gateway
from benchmarks.triton import MODEL_NAME, build_demo_run, machine, triton_call
from clients import Client
from serving.convert import convert, load_export
from serving.triton_config import ServingOptions
from serving.triton_process import start_tritonserver
from training.io import atomic_write_json

log = logging.getLogger("benchmarks.triton_gateway")
CONCURRENCIES = (1, 4, 16)
MAX_BATCH = 8


def added_latency(direct, gateway, rounds: int, requests: int, warmup: int) -> dict:
    """Alternating rounds of ``requests`` sequential calls per path; pooled p50/p99 (ms) and the difference."""
    paths = {"direct": direct, "gateway": gateway}
    times: dict[str, list[float]] = {k: [] for k in paths}
    stages: list[dict[str, float]] = []  # the gateway's own timings of each measured request
    for call in paths.values():
        for _ in range(warmup):
            call()
    for r in range(rounds):
        for name in (list(paths) if r % 2 == 0 else list(reversed(paths))):
            call = paths[name]
            for _ in range(requests):
                t0 = time.perf_counter()
                answer = call()
                times[name].append(1e3 * (time.perf_counter() - t0))
                if name == "gateway":
                    stages.append(answer.timings)
        log.info("round %d/%d: direct p50 %.2f ms, gateway p50 %.2f ms", r + 1, rounds,
                 np.median(times["direct"]), np.median(times["gateway"]))
    out = {k: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)), "requests": len(v)}
           for k, v in times.items()}
    out["added"] = {q: out["gateway"][q] - out["direct"][q] for q in ("p50_ms", "p99_ms")}
    out["gateway"]["server_ms"] = {k: float(np.median([t[k] for t in stages])) for k in stages[0]}
    return out


def load_figures(server: str, image_path: Path, seconds: float) -> dict[int, dict]:
    from clients.loadgen import run_load

    return {c: run_load(server, model=MODEL_NAME, image=image_path, concurrency=c, duration=seconds, warmup=2 * c)
            for c in CONCURRENCIES}


def benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    run = build_demo_run(tmp / "run")
    export = load_export(run)
    repo = tmp / "model_repository"
    convert(run, repo, MODEL_NAME, ServingOptions(format="python", max_batch=MAX_BATCH, intra_op_threads=args.threads))
    height, width = export.spec.inputs[0].concrete_shape(1)[-2:]
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image_path = tmp / "image.png"
    from PIL import Image

    Image.fromarray(pixels).save(image_path)
    common = ["--max-queue-delay-ms", "0"]
    with start_tritonserver(repo, extra_args=("--disable-auto-complete-config",)) as triton, \
            grpcclient.InferenceServerClient(triton.grpc_url) as direct_client:
        fronted, fronted_port = start_gateway(repo, MODEL_NAME, args.threads, MAX_BATCH,
                                              ["--backend", "triton", "--triton-url", triton.grpc_url, *common])
        embedded, embedded_port = start_gateway(repo, MODEL_NAME, args.threads, MAX_BATCH, common)
        try:
            direct_call = triton_call(direct_client, export)
            x = (pixels.transpose(2, 0, 1)[None] / np.float32(255)).astype(np.float32)
            with Client(f"127.0.0.1:{fronted_port}") as client:
                check = client.predict(MODEL_NAME, pixels)
                tasks = {t["name"] for t in export.manifest["tasks"]}
                if set(check.outputs) != tasks:
                    raise RuntimeError(f"the gateway answered {sorted(check.outputs)}, not every task {sorted(tasks)}")
                latency = added_latency(lambda: direct_call(x), lambda: client.predict(MODEL_NAME, pixels),
                                        args.rounds, args.requests, args.warmup)
            load = {"embedded": load_figures(f"127.0.0.1:{embedded_port}", image_path, args.seconds),
                    "triton": load_figures(f"127.0.0.1:{fronted_port}", image_path, args.seconds)}
            tritonserver = direct_client.get_server_metadata().version
        finally:
            stop_gateway(fronted)
            stop_gateway(embedded)
    env = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "tritonserver": tritonserver, "tritonclient": version("tritonclient"),
           "image_size": [int(height), int(width)], "model": export.manifest["model_name"],
           "macs": export.manifest["complexity"]["macs"], "parameters": export.manifest["complexity"]["parameters"]}
    return {"env": env, "latency": latency, "load": load}


def _load_rows(load: dict) -> list[str]:
    rows = []
    for backend, label in (("embedded", "embedded ONNX Runtime"), ("triton", "Triton (python backend)")):
        for c, r in load[backend].items():
            lat = r["latency_ms"]
            errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
            server = r["server_ms"]
            rows.append(f"| {label} | {c} | {r['sent']} | {r['throughput_rps']:.1f} | {lat['p50']:.2f} | "
                        f"{lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} | {server['total_ms']:.2f} / "
                        f"{server['queue_ms']:.2f} / {server['inference_ms']:.2f} | {server['batch_size_mean']:.2f} | "
                        f"{errors} |")
    return rows


def report(result: dict, args: argparse.Namespace, argv: list[str]) -> str:
    env, lat = result["env"], result["latency"]
    h, w = env["image_size"]
    lines = [
        f"### The gateway in front of Triton, and the load tool: {env['model']}, {h}x{w}", "",
        f"- {env['date']}; `{shlex.join(['python', '-m', 'benchmarks.triton_gateway', *argv])}`",
        f"- {env['machine']}; Triton, both gateways and the client share these cores",
        f"- tritonserver {env['tritonserver']} (nvidia-pytriton), tritonclient {env['tritonclient']}; model: the demo's "
        f"encoder, untrained, half its encoder channels removed, {env['parameters'] / 1e6:.3f} M parameters, "
        f"{env['macs'] / 1e9:.3f} GMACs/image; Triton: `--format python --max-batch {MAX_BATCH}`, one CPU instance; "
        f"gateways: `--max-batch {MAX_BATCH} --max-queue-delay-ms 0 --threads {args.threads}`",
        "", f"Batch 1, sequential, {args.rounds} alternating rounds of {args.requests} requests per path:", "",
        "| path | p50 ms | p99 ms |", "|---|---|---|",
        f"| Triton direct (tritonclient gRPC, float32 tensor) | {lat['direct']['p50_ms']:.2f} | "
        f"{lat['direct']['p99_ms']:.2f} |",
        f"| client → gateway → Triton (uint8 image, every task post-processed) | {lat['gateway']['p50_ms']:.2f} | "
        f"{lat['gateway']['p99_ms']:.2f} |",
        f"| **added by the gateway** | **{lat['added']['p50_ms']:+.2f}** | **{lat['added']['p99_ms']:+.2f}** |",
        "", "The gateway's own timing of those requests (median ms): " + ", ".join(
            f"{k.removesuffix('_ms')} {v:.2f}" for k, v in lat["gateway"]["server_ms"].items()) +
        " (inference: the call to Triton as the gateway sees it).",
        "", f"`python -m clients.load` (closed loop, {args.seconds:g} s per row, gRPC, the same PNG each request):", "",
        "| backend | concurrency | requests | throughput req/s | p50 ms | p90 ms | p99 ms | max ms | "
        "server total / queue / inference ms (median) | mean batch | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *_load_rows(result["load"]), ""]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 short rounds and 2 s load runs: a smoke test")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads in Triton and the gateway")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    args = p.parse_args(argv)
    args.rounds, args.requests, args.warmup, args.seconds = (2, 50, 10, 2.0) if args.quick else (6, 200, 30, 10.0)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("training").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="triton-gateway-bench-") as tmp:
        result = benchmark(args, Path(tmp))
    print(report(result, args, argv))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
