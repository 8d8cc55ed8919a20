"""The gateway in front of Triton against calling Triton directly, before and after final graphs, and
the load tool's figures.

    python -m benchmarks.triton_gateway                  # full measurement (about 4 minutes)
    python -m benchmarks.triton_gateway --quick          # a smoke test
    python -m benchmarks.triton_gateway --json out.json  # also the raw figures

One run, one model (the demo's: tiny encoder, 96x128, half its encoder channels removed, as
`benchmarks._final_models` builds it) exported twice from the same compact model: the raw graph
(``--raw-outputs``, *before*: float32 input, logits out) as model ``bench-raw`` and the final graph
(*after*: uint8 pixels in, the answers out) as ``bench``, both converted with ``--format python``
(ONNX Runtime inside Triton's python backend, one CPU instance, dynamic batching up to 8) into one
repository. Three servers on loopback: the real ``tritonserver`` (nvidia-pytriton), a gateway with
``--backend triton`` serving both models in front of it, and a gateway with the embedded ONNX Runtime
backend serving ``bench``. Everything shares this machine's cores.

1. **Added latency of the gateway** (batch 1, one request at a time), for each graph: *direct* is
   tritonclient's gRPC ``infer`` asking for what the gateway asks Triton for (before: the float32
   tensor the gateway would make, every task's logits; after: the uint8 pixels, each task's answer
   as the gateway returns it by default), read into numpy; *gateway* is `clients.Client.predict`
   over gRPC with the raw uint8 image (no image decode on either side; before, the gateway converts
   it and post-processes every task; after, it passes the answers through). The four paths
   alternate in rounds (reversed order every other round) so that drift in the machine's load hits
   all alike; p50 and p99 pool every request. The difference is what the gateway adds: a second
   gRPC hop, its batcher and its own work. Target: at most +1.5 ms at p50 with the final graph.
2. **The load tool** (`clients.loadgen.run_load`, closed loop) against the embedded gateway at
   concurrency 1, 4 and 16, and against the Triton gateway at the same concurrencies, for
   ``--seconds`` each, on the final graph: throughput, client-side p50/p90/p99/max, errors by code.
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
from tritonclient.utils import np_to_triton_dtype

from benchmarks._final_models import CASES, GRAPHS, call_outputs, export_pair, graph_input, metadata
from benchmarks._timing import configure_logging
from benchmarks.gateway import start_gateway, stop_gateway
from benchmarks.triton import MODEL_NAME, machine
from clients import Client
from parsimony.io import atomic_write_json
from parsimony.spec import INPUT_NAME
from serving.convert import convert
from serving.server.metadata import ModelMetadata
from serving.triton_config import ServingOptions
from serving.triton_process import start_tritonserver

log = logging.getLogger("benchmarks.triton_gateway")
CONCURRENCIES = (1, 4, 16)
MAX_BATCH = 8
NAMES = {"raw": f"{MODEL_NAME}-raw", "final": MODEL_NAME}
ADDED_TARGET_MS = 1.5  # p50 added by the gateway in front of Triton, final graph
PATHS = {"direct-raw": "Triton direct, before: raw graph (float32 tensor in, every task's logits out)",
         "gateway-raw": "client → gateway → Triton, before (uint8 image; converted, every task post-processed)",
         "direct-final": "Triton direct, after: final graph (uint8 pixels in, every task's answer out)",
         "gateway-final": "client → gateway → Triton, after (uint8 image; the answers passed through)"}


def direct_call(client: grpcclient.InferenceServerClient, meta: ModelMetadata, pixels: np.ndarray, sizes: list[int]):
    """tritonclient's gRPC ``infer`` of ``pixels`` as the gateway sends them to Triton, asking for what
    the gateway asks for by default; each response's serialized size goes to ``sizes``."""
    x = graph_input(meta, pixels[None])
    names = list(call_outputs(meta))
    tensor = grpcclient.InferInput(INPUT_NAME, list(x.shape), np_to_triton_dtype(x.dtype))
    tensor.set_data_from_numpy(x)
    requested = [grpcclient.InferRequestedOutput(n) for n in names]

    def call() -> list[np.ndarray]:
        result = client.infer(meta.name, [tensor], outputs=requested)
        sizes.append(result.get_response().ByteSize())
        return [result.as_numpy(n) for n in names]

    return call


def added_latency(paths: dict, rounds: int, requests: int, warmup: int) -> dict:
    """Alternating rounds of ``requests`` sequential calls per path; pooled p50/p99 (ms) per path and
    what the gateway adds to the direct call on each graph."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    stages: dict[str, list[dict]] = {k: [] for k in paths if k.startswith("gateway")}  # the gateway's own timings
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
                if name in stages:
                    stages[name].append(answer.timings)
        log.info("round %d/%d: %s", r + 1, rounds, ", ".join(f"{k} p50 {np.median(v):.2f} ms" for k, v in times.items()))
    out = {k: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)), "requests": len(v)}
           for k, v in times.items()}
    for name, timings in stages.items():
        out[name]["server_ms"] = {k: float(np.median([t[k] for t in timings])) for k in timings[0]}
    out["added"] = {g: {q: out[f"gateway-{g}"][q] - out[f"direct-{g}"][q] for q in ("p50_ms", "p99_ms")}
                    for g in GRAPHS}
    out["met"] = out["added"]["final"]["p50_ms"] <= ADDED_TARGET_MS
    return out


def load_figures(server: str, image_path: Path, seconds: float) -> dict[int, dict]:
    from clients.loadgen import run_load

    return {c: run_load(server, model=MODEL_NAME, image=image_path, concurrency=c, duration=seconds, warmup=2 * c)
            for c in CONCURRENCIES}


def benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    folders = export_pair("demo", CASES["demo"].image_size, {g: tmp / "exports" / g for g in GRAPHS})
    repo = tmp / "model_repository"
    options = ServingOptions(format="python", max_batch=MAX_BATCH, intra_op_threads=args.threads)
    for g in GRAPHS:
        convert(folders[g], repo, NAMES[g], options)
    metas = {g: metadata(folders[g], NAMES[g]) for g in GRAPHS}
    height, width = metas["final"].height, metas["final"].width
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image_path = tmp / "image.png"
    from PIL import Image

    Image.fromarray(pixels).save(image_path)
    common = ["--max-queue-delay-ms", "0"]
    with start_tritonserver(repo, extra_args=("--disable-auto-complete-config",)) as triton, \
            grpcclient.InferenceServerClient(triton.grpc_url) as direct_client:
        fronted, fronted_port = start_gateway(repo, NAMES["final"], args.threads, MAX_BATCH,
                                              ["--model", NAMES["raw"], "--backend", "triton", "--triton-url",
                                               triton.grpc_url, *common])
        embedded, embedded_port = start_gateway(repo, NAMES["final"], args.threads, MAX_BATCH, common)
        try:
            sizes: dict[str, list[int]] = {g: [] for g in GRAPHS}
            with Client(f"127.0.0.1:{fronted_port}") as client:
                for g in GRAPHS:
                    check = client.predict(NAMES[g], pixels)
                    if set(check.outputs) != set(metas[g].task_names):
                        raise RuntimeError(f"the gateway answered {sorted(check.outputs)} for {NAMES[g]}, not every "
                                           f"task {sorted(metas[g].task_names)}")
                paths = {}
                for g in GRAPHS:
                    paths[f"direct-{g}"] = direct_call(direct_client, metas[g], pixels, sizes[g])
                    paths[f"gateway-{g}"] = lambda g=g: client.predict(NAMES[g], pixels)
                latency = added_latency(paths, args.rounds, args.requests, args.warmup)
            latency["triton_response_bytes"] = {g: int(np.median(v)) for g, v in sizes.items()}
            load = ({"embedded": load_figures(f"127.0.0.1:{embedded_port}", image_path, args.seconds),
                     "triton": load_figures(f"127.0.0.1:{fronted_port}", image_path, args.seconds)} if args.load else None)
            tritonserver = direct_client.get_server_metadata().version
        finally:
            stop_gateway(fronted)
            stop_gateway(embedded)
    manifest = metas["final"].manifest
    env = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "tritonserver": tritonserver, "tritonclient": version("tritonclient"), "image_size": [height, width],
           "model": manifest.model_name, "macs": manifest.complexity.macs, "parameters": manifest.complexity.parameters}
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


def _latency_rows(lat: dict) -> list[str]:
    rows = []
    for g, when in (("raw", "before"), ("final", "after")):
        for path in (f"direct-{g}", f"gateway-{g}"):
            rows.append(f"| {PATHS[path]} | {lat[path]['p50_ms']:.2f} | {lat[path]['p99_ms']:.2f} |")
        added = lat["added"][g]
        target = f" {'✓' if lat['met'] else '✗'} (≤ +{ADDED_TARGET_MS:g})" if g == "final" else ""
        rows.append(f"| **added by the gateway, {when}** | **{added['p50_ms']:+.2f}**{target} | "
                    f"**{added['p99_ms']:+.2f}** |")
    return rows


def report(result: dict, args: argparse.Namespace, argv: list[str]) -> str:
    env, lat = result["env"], result["latency"]
    h, w = env["image_size"]
    stages = [f"{when} " + ", ".join(f"{k.removesuffix('_ms')} {v:.2f}" for k, v in lat[f"gateway-{g}"]["server_ms"].items())
              for g, when in (("raw", "before"), ("final", "after"))]
    sizes = lat["triton_response_bytes"]
    lines = [
        f"### The gateway in front of Triton, and the load tool: {env['model']}, {h}x{w}", "",
        f"- {env['date']}; `{shlex.join(['python', '-m', 'benchmarks.triton_gateway', *argv])}`",
        f"- {env['machine']}; Triton, both gateways and the client share these cores",
        f"- tritonserver {env['tritonserver']} (nvidia-pytriton), tritonclient {env['tritonclient']}; model: the demo's "
        f"encoder, untrained, half its encoder channels removed, {env['parameters'] / 1e6:.3f} M parameters, "
        f"{env['macs'] / 1e9:.3f} GMACs/image, exported as the raw graph (`--raw-outputs`, before) and the final graph "
        f"(after); Triton: `--format python --max-batch {MAX_BATCH}`, one CPU instance; "
        f"gateways: `--max-batch {MAX_BATCH} --max-queue-delay-ms 0 --threads {args.threads}`",
        "", f"Batch 1, sequential, {args.rounds} alternating rounds of {args.requests} requests per path:", "",
        "| path | p50 ms | p99 ms |", "|---|---|---|", *_latency_rows(lat),
        "", f"Triton's gRPC response to the gateway's call: {sizes['raw']:,} bytes before, {sizes['final']:,} after. "
        "The gateway's own timing of its requests (median ms; inference: the call to Triton as the gateway sees it): "
        + "; ".join(stages) + "."]
    if result["load"] is not None:
        lines += ["", f"`python -m clients.load` on the final graph (closed loop, {args.seconds:g} s per row, gRPC, the "
                  "same PNG each request):", "",
                  "| backend | concurrency | requests | throughput req/s | p50 ms | p90 ms | p99 ms | max ms | "
                  "server total / queue / inference ms (median) | mean batch | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|", *_load_rows(result["load"])]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 short rounds and 2 s load runs: a smoke test")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads in Triton and the gateway")
    p.add_argument("--no-load", dest="load", action="store_false", help="skip the load tool's figures")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    args = p.parse_args(argv)
    args.rounds, args.requests, args.warmup, args.seconds = (2, 50, 10, 2.0) if args.quick else (6, 200, 30, 10.0)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="triton-gateway-bench-") as tmp:
        result = benchmark(args, Path(tmp))
    print(report(result, args, argv))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
