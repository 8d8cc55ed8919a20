"""Final outputs computed in the exported graph against today's raw graph, side by side in one run.

    python -m benchmarks.final_graph                     # both models at full size (about 7 minutes)
    python -m benchmarks.final_graph --quick             # tiny sizes, short runs: a smoke test
    python -m benchmarks.final_graph --json final.json --markdown docs/BENCHMARKS.md

Each model of `benchmarks._final_models` (the demo model at 96x128; the dilated ResNet-50 at
288x384 with NYU-v2's 13 classes) is exported twice from one compact model: *before*, the raw graph
(``--raw-outputs``: float32 input, logits; the gateway converts the pixels and post-processes in
Python), and *after*, the final graph (uint8 input, the answers computed in the graph). Measured:

1. **bytes per response on each hop**, exactly (no timing), for float32 and float16 outputs, with
   and without probabilities: the gateway's gRPC request to Triton and Triton's gRPC response for
   the outputs the gateway asks for (what a direct tritonclient call asking for the same moves too),
   and the gateway's answer to its client (gRPC ``PredictResponse``, HTTP JSON body);
2. **ONNX Runtime latency** at batch 1 and 8: the final graph (uint8 in, the outputs the gateway
   asks for by default) against the raw graph plus the Python it replaces (the gateway's uint8 to
   float conversion of each image and each task's `parsimony.tasks.Kind.postprocess`); target:
   never slower;
3. **the gateway's own CPU per request** (the demo model, ``--cpu-models``): one gateway (embedded
   ONNX Runtime with one intra-op thread, so that a forward pass's wall time is its CPU time)
   serves both graphs; sequential gRPC Predict calls with a raw uint8 tensor, in alternating
   windows of ``--cpu-requests``; per window, the gateway process's CPU time (``/proc/PID/stat``)
   minus its forward passes as it times them (the ``inference`` stage, summed), per request. As a
   cross-check that preemption cannot skew (a forward pass's wall time counts time the thread did
   not run), the same minus the thread CPU time of as many forward passes in this process, in
   sessions configured as the gateway's. For reference, the same calls to a no-op gRPC server
   answering the same bytes (what Python gRPC costs a server per call); target: after at most half
   of before;
4. **the gateway against in-process ONNX Runtime**, p50 at batch 1: one gateway (every core) serves
   both graphs; ORT in this process runs the same graph as the gateway it is compared with
   (before: float32 input, every output, as `benchmarks.gateway` measures it; after: uint8 input,
   the outputs the gateway asks for); target: gateway p50 at most 1.05 x ORT's on the ResNet-50.

Timed series alternate in ``--rounds`` rounds (reversed order every other round), since this
machine's speed drifts by 10-30 % within minutes; the tables give medians over all rounds.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from benchmarks._final_models import (
    CASES,
    GRAPHS,
    answers,
    call_outputs,
    client_response_bytes,
    export_pair,
    graph_input,
    metadata,
    triton_request_bytes,
    triton_response_bytes,
)
from benchmarks._final_report import report
from benchmarks._gateway_bounds import echo_server, process_cpu_s
from benchmarks._gateway_report import update_markdown
from benchmarks._timing import configure_logging
from benchmarks.gateway import start_gateway, stop_gateway, tensor_request, test_image
from parsimony import onnxrt
from parsimony.io import atomic_write_json
from parsimony.layout import ONNX_FILE
from parsimony.spec import INPUT_NAME
from parsimony.wire import STAGE_FIELDS
from serving.proto.parsimony.v1 import gateway_pb2_grpc as pb_grpc
from serving.server.config import default
from serving.server.metadata import ModelMetadata
from training.timing import sample_ms

log = logging.getLogger("benchmarks.final_graph")
VARIANTS = tuple((dtype, probabilities) for dtype in ("float32", "float16") for probabilities in (False, True))
PARTS = ("bytes", "ort", "cpu", "gateway")
CPU_TARGET, P50_TARGET = 0.5, 1.05  # own CPU after / before; gateway p50 / ORT p50


def alternate(calls: dict[str, Callable[[], object]], rounds: int, *, repeats: int, min_time: float) -> dict:
    """Wall ms per call of each of ``calls``: ``rounds`` rounds of one series each, back to back (the
    order reversed every other round), each at least ``repeats`` calls and ``min_time`` seconds; one
    unmeasured call per series in the first round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            times[name] += sample_ms(calls[name], repeats=repeats, warmup=1 if r == 0 else 0, min_time=min_time)
    return times


# --- 1. bytes on each hop ---------------------------------------------------------------------------


def hop_bytes(key: str, metas: dict[str, ModelMetadata], runs: dict, image: np.ndarray) -> list[dict]:
    """One row per output variant (`VARIANTS`): for each graph, the tensors the gateway asks for and
    the bytes of the request to Triton, of Triton's response and of the answer to the client."""
    rows = []
    for dtype, probabilities in VARIANTS:
        row: dict = {"output_dtype": dtype, "probabilities": probabilities}
        for graph, meta in metas.items():
            outputs = call_outputs(meta, dtype=dtype, probabilities=probabilities)
            x = graph_input(meta, image[None])
            tensors = dict(zip(outputs, runs[graph].run(list(outputs), {INPUT_NAME: x}), strict=True))
            answer = answers(meta, outputs, tensors, 0, dtype=dtype, probabilities=probabilities)
            row[graph] = {"outputs": {name: [str(tensors[name].dtype), list(tensors[name].shape)] for name in outputs},
                          "to_triton": triton_request_bytes(key, x, list(outputs)),
                          "from_triton": triton_response_bytes(key, tensors),
                          "to_client": client_response_bytes(key, answer)}
        rows.append(row)
    return rows


# --- 2. ONNX Runtime: the final graph against the raw graph plus Python ------------------------------


def pipeline(session: ort.InferenceSession, meta: ModelMetadata, images: np.ndarray) -> Callable[[], list]:
    """A batch through a graph as the gateway's embedded backend takes it there: each image as the
    graph takes it, the forward pass (the outputs a default call asks for), each image's answer."""
    outputs = call_outputs(meta)
    names = list(outputs)

    def run() -> list:
        tensors = dict(zip(names, session.run(names, {INPUT_NAME: graph_input(meta, images)}), strict=True))
        return [answers(meta, outputs, tensors, i) for i in range(len(images))]

    return run


def python_ms(session: ort.InferenceSession, meta: ModelMetadata, images: np.ndarray, repeats: int) -> float:
    """Median ms of the raw path's Python alone: converting the images and post-processing every task."""
    outputs = call_outputs(meta)
    names = list(outputs)
    tensors = dict(zip(names, session.run(names, {INPUT_NAME: graph_input(meta, images)}), strict=True))

    def python() -> None:
        graph_input(meta, images)
        for i in range(len(images)):
            answers(meta, outputs, tensors, i)

    return statistics.median(sample_ms(python, repeats=repeats, min_time=0.2))


def ort_latency(metas: dict[str, ModelMetadata], runs: dict, image: np.ndarray, args) -> list[dict]:
    """Per batch size: the raw graph plus Python, the final graph (pruned to the outputs asked for,
    `parsimony.onnxrt.prune`) and, for reference, the final graph's whole session (ONNX Runtime runs
    every node of a graph whatever outputs a run asks for)."""
    rows = []
    for batch in args.batches:
        images = np.ascontiguousarray(np.repeat(image[None], batch, axis=0))
        calls = {"raw": pipeline(runs["raw"], metas["raw"], images),
                 "final": pipeline(runs["final-pruned"], metas["final"], images),
                 "final-unpruned": pipeline(runs["final"], metas["final"], images)}
        times = alternate(calls, args.rounds, repeats=max(1, args.calls // batch), min_time=args.seconds / args.rounds)
        raw, final = statistics.median(times["raw"]), statistics.median(times["final"])
        rows.append({"batch": batch, "raw_ms": raw, "final_ms": final, "ratio": final / raw, "met": final <= raw,
                     "final_unpruned_ms": statistics.median(times["final-unpruned"]),
                     "python_ms": python_ms(runs["raw"], metas["raw"], images, max(args.calls, 10)),
                     "calls": {g: len(t) for g, t in times.items()}})
        log.info("ORT batch %d: raw graph + Python %.2f ms, final graph %.2f ms", batch, raw, final)
    return rows


# --- 3. the gateway's own CPU per request -----------------------------------------------------------


def _cpu_window(stub, request, pid: int, n: int, tally: dict, forward: Callable[[], object]) -> None:
    """``n`` gateway calls, the gateway's CPU time over them, then ``n`` forward passes in this process
    (one intra-op thread: ONNX Runtime runs on the calling thread) and their thread CPU time."""
    cpu0 = process_cpu_s(pid)
    for _ in range(n):
        t0 = time.perf_counter()
        response = stub.Predict(request)
        tally["client_ms"].append(1e3 * (time.perf_counter() - t0))
        tally["stages"].append({f: getattr(response.timings, f) for f in STAGE_FIELDS})
    tally["cpu_s"] += process_cpu_s(pid) - cpu0
    tally["response_bytes"] = response.ByteSize()
    cpu0 = time.thread_time()
    for _ in range(n):
        forward()
    tally["forward_cpu_s"] += time.thread_time() - cpu0


def _cpu_summary(tally: dict) -> dict:
    n = len(tally["stages"])
    forward_ms = sum(s["inference_ms"] for s in tally["stages"]) / n
    cpu_ms, forward_cpu_ms = tally["cpu_s"] * 1e3 / n, tally["forward_cpu_s"] * 1e3 / n
    return {"requests": n, "cpu_ms": cpu_ms, "forward_ms": forward_ms, "own_cpu_ms": cpu_ms - forward_ms,
            "forward_cpu_ms": forward_cpu_ms, "own_cpu_by_forward_cpu_ms": cpu_ms - forward_cpu_ms,
            "stages_ms": {f: statistics.median(s[f] for s in tally["stages"]) for f in STAGE_FIELDS},
            "around_forward_ms": statistics.median(s["total_ms"] - s["inference_ms"] for s in tally["stages"]),
            "client_p50_ms": statistics.median(tally["client_ms"]), "response_bytes": tally["response_bytes"]}


def gateway_cpu(repo: Path, metas: dict[str, ModelMetadata], image: np.ndarray, args) -> dict:
    """The gateway's CPU per request over alternating windows of each graph (module doc, 3.)."""
    names = {g: meta.name for g, meta in metas.items()}
    forwards = {}
    for g, meta in metas.items():  # the gateway's sessions: one thread, the final graph pruned to the default call
        session = onnxrt.session(repo / meta.name / "1" / ONNX_FILE, threads=1, spinning=args.ort_spinning,
                                 outputs=list(call_outputs(meta)) if meta.final else None)
        feed = {INPUT_NAME: graph_input(meta, image[None])}
        forwards[g] = lambda session=session, feed=feed: session.run(None, feed)
    proc, port = start_gateway(repo, names["final"], 1, 1, ["--model", names["raw"], "--ort-spinning", args.ort_spinning])
    tallies = {g: {"cpu_s": 0.0, "forward_cpu_s": 0.0, "client_ms": [], "stages": []} for g in GRAPHS}
    requests = {g: tensor_request(names[g], image) for g in GRAPHS}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            for request in requests.values():
                for _ in range(args.warmup):
                    stub.Predict(request)
            for r in range(args.rounds):
                for g in (GRAPHS if r % 2 == 0 else tuple(reversed(GRAPHS))):
                    _cpu_window(stub, requests[g], proc.pid, args.cpu_requests, tallies[g], forwards[g])
            canned = stub.Predict(requests["final"]).SerializeToString()
    finally:
        stop_gateway(proc)
    result = {g: _cpu_summary(t) for g, t in tallies.items()}
    result["noop_cpu_ms"] = noop = noop_cpu_ms(canned, requests["final"], args.rounds * args.cpu_requests)
    for g in GRAPHS:
        result[g]["beyond_noop_ms"] = result[g]["own_cpu_ms"] - noop
    result["ratio"] = result["final"]["own_cpu_ms"] / result["raw"]["own_cpu_ms"]
    result["ratio_beyond_noop"] = result["final"]["beyond_noop_ms"] / result["raw"]["beyond_noop_ms"]
    result["ratio_by_forward_cpu"] = (result["final"]["own_cpu_by_forward_cpu_ms"]
                                      / result["raw"]["own_cpu_by_forward_cpu_ms"])
    result["met"] = result["ratio"] <= CPU_TARGET
    return result


def noop_cpu_ms(response: bytes, request, n: int) -> float:
    """CPU ms per call of a no-op grpc.aio server answering ``response``'s bytes, over ``n`` sequential calls."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=echo_server, args=(response, ports), daemon=True)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=60)}") as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            for _ in range(10):
                stub.Predict(request)
            cpu0 = process_cpu_s(server.pid)
            for _ in range(n):
                stub.Predict(request)
            return (process_cpu_s(server.pid) - cpu0) * 1e3 / n
    finally:
        server.terminate()
        server.join(30)


# --- 4. the gateway against in-process ONNX Runtime -------------------------------------------------


def gateway_latency(repo: Path, metas: dict[str, ModelMetadata], runs: dict, image: np.ndarray, args) -> dict:
    """p50 at batch 1 of in-process ORT and of the gateway on each graph, in alternating rounds."""
    names = {g: meta.name for g, meta in metas.items()}
    feeds = {g: {INPUT_NAME: graph_input(metas[g], image[None])} for g in GRAPHS}
    sessions = {"raw": runs["raw"], "final": runs["final-pruned"]}
    wanted = {"raw": None, "final": list(call_outputs(metas["final"]))}  # raw: every output, as before
    proc, port = start_gateway(repo, names["final"], args.threads, 1,
                               ["--model", names["raw"], "--ort-spinning", args.ort_spinning])
    responses: dict[str, list] = {g: [] for g in GRAPHS}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            calls = {}
            for g in GRAPHS:
                request = tensor_request(names[g], image)
                calls[f"ort-{g}"] = lambda g=g: sessions[g].run(wanted[g], feeds[g])
                calls[f"gateway-{g}"] = lambda g=g, request=request: responses[g].append(stub.Predict(request))
            times = alternate(calls, args.rounds, repeats=args.calls, min_time=args.seconds / args.rounds / 2)
    finally:
        stop_gateway(proc)
    result = {}
    for g in GRAPHS:
        ort_p50, gateway_p50 = statistics.median(times[f"ort-{g}"]), statistics.median(times[f"gateway-{g}"])
        result[g] = {"ort_p50_ms": ort_p50, "gateway_p50_ms": gateway_p50, "ratio": gateway_p50 / ort_p50,
                     "calls": len(times[f"gateway-{g}"]), "response_bytes": responses[g][-1].ByteSize(),
                     "server_ms": {f: statistics.median(getattr(r.timings, f) for r in responses[g])
                                   for f in STAGE_FIELDS}}
    result["met"] = result["final"]["ratio"] <= P50_TARGET
    return result


# --- the run ----------------------------------------------------------------------------------------


def run_model(key: str, args, tmp: Path) -> dict:
    size = CASES[key].size(args.quick)
    names = {g: f"{key}-{g}" for g in GRAPHS}
    repo = tmp / "repository"
    folders = export_pair(key, size, {g: repo / names[g] / "1" for g in GRAPHS}, args.seed)
    metas = {g: metadata(folder, names[g]) for g, folder in folders.items()}
    runs = {g: onnxrt.session(folder / ONNX_FILE, threads=args.threads, spinning=args.ort_spinning)
            for g, folder in folders.items()}
    runs["final-pruned"] = onnxrt.session(folders["final"] / ONNX_FILE, threads=args.threads, spinning=args.ort_spinning,
                                          outputs=list(call_outputs(metas["final"])))
    image = test_image(size)
    result: dict = {"model": key, "case": CASES[key].name, "image_size": list(size),
                    "graphs": {g: meta.io_spec.to_dict() for g, meta in metas.items()}}
    if "bytes" in args.parts:
        result["bytes"] = hop_bytes(key, metas, runs, image)
    if "ort" in args.parts:
        log.info("%s %dx%d: ONNX Runtime, raw graph + Python against the final graph", key, *size)
        result["ort"] = ort_latency(metas, runs, image, args)
    if "cpu" in args.parts and key in args.cpu_models:
        log.info("%s: the gateway's CPU per request", key)
        result["cpu"] = gateway_cpu(repo, metas, image, args)
    if "gateway" in args.parts:
        log.info("%s: the gateway against in-process ONNX Runtime", key)
        result["gateway"] = gateway_latency(repo, metas, runs, image, args)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.final_graph", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument("--cpu-models", nargs="+", choices=list(CASES), default=["demo"],
                   help="the models whose gateway CPU per request is measured (default: demo)")
    p.add_argument("--quick", action="store_true", help="tiny image sizes and short runs: a smoke test")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="ONNX Runtime intra-op threads, in process and in the gateway (the CPU part uses 1)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="ONNX Runtime batch sizes (default 1 8)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 6; quick 2)")
    p.add_argument("--calls", type=int, help="at least this many calls per series and round (default 5; quick 2; "
                                             "ONNX Runtime: divided by the batch size)")
    p.add_argument("--seconds", type=float, help="at least this long per series, over all rounds (default 12; quick 0.4)")
    p.add_argument("--cpu-requests", type=int, help="requests per CPU window (default 200; quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured gateway calls per graph first (default 20; quick 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the zeroed channels")
    p.add_argument("--ort-spinning", choices=list(onnxrt.SPINNING), default=default("ort_spinning"),
                   help=f"ONNX Runtime's spinning, in process and in the gateway (default {default('ort_spinning')})")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--markdown", type=Path, help="write the tables into this file's final-graph section")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("rounds", 6, 2), ("calls", 5, 2), ("seconds", 12.0, 0.4), ("cpu_requests", 200, 10),
                              ("warmup", 20, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if min(args.rounds, args.calls, args.cpu_requests, args.threads, *args.batches) < 1 or args.seconds <= 0:
        p.error("--rounds, --calls, --cpu-requests, --threads and --batches must be positive, --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configure_logging()
    env = {"command": " ".join(["python -m benchmarks.final_graph", *argv]), "onnxruntime": ort.__version__,
           "threads": args.threads, "cores": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
           "python": platform.python_version(), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="final-graph-bench-") as tmp:
        results = [run_model(key, args, Path(tmp) / key) for key in args.models]
    env["load_average_after"] = os.getloadavg()
    text = report(results, args, env)
    print(text)
    if args.markdown:
        update_markdown(args.markdown, text, name="final_graph",
                        title="Final outputs in the graph: before and after (`python -m benchmarks.final_graph`)")
    if args.json:
        atomic_write_json(args.json, {"env": env, "args": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()}, "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
