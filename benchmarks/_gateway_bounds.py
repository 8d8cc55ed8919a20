"""What no Python gRPC front end can beat on this machine: the bounds behind the gateway's targets.

The gateway's targets compare it with ONNX Runtime called in process, where a request costs
nothing but the forward pass. A gRPC front end adds, per request, at least what a server that
does nothing costs: receive and parse an HTTP/2 request, hand it to Python, send the response
bytes back. Measured here, in the same run as the gateway:

- **the no-op server's cost per call**, with a near-free client: h2load (nghttp2's load generator,
  written in C, Debian package ``nghttp2-client``) sends the gateway's own request bytes as gRPC
  frames to a grpc.aio server that answers every call with the gateway's response bytes. The
  server's CPU time per call comes from ``/proc/PID/stat``; its latency at concurrency 1 is the
  round trip with no Python on the client side;
- **the gateway's own throughput and cost per call**, the same way (h2load against the real gateway),
  so that its figure is not held down by a Python client sharing its cores.

From these, two ceilings that hold for any Python gRPC gateway (``ceilings``):

- p50 at batch 1 is at least ORT's p50 plus the no-op round trip;
- throughput with ``cores`` cores is at most ``1 / (1/best + noop_cpu/cores)``: every image needs
  its forward pass and every call at least the no-op server's CPU time, from the same cores.

When a ceiling is below its target, no Python gRPC front end meets that target on this machine
and model, whatever it does around the forward pass.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from serving.server.grpc_service import SERVICE

H2LOAD = "h2load"
INSTALL_HINT = "apt-get install nghttp2-client"


def h2load_available() -> bool:
    return shutil.which(H2LOAD) is not None


def process_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` (all its threads, ended ones too) so far: its CPU-time clock
    (nanoseconds; Linux's clock id of a process is ``~pid << 3 | 2``), else user + system time from
    ``/proc/PID/stat`` (clock ticks, 10 ms here)."""
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def h2load_run(port: int, request: bytes, *, concurrency: int, seconds: float, pid: int,
               response_bytes: int) -> dict:
    """``concurrency`` concurrent unary Predict calls from h2load (one connection, like one gRPC
    channel) for ``seconds``; requests/s, median latency, and the CPU ms per call of process ``pid``.

    h2load counts HTTP statuses, while gRPC reports a failed call in its trailers under status 200;
    so every call must also have brought back at least ``response_bytes`` of data (an answer, not
    an error status), or this raises."""
    duration = max(1, round(seconds))  # h2load takes whole seconds
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body, log = Path(tmp) / "request.grpc", Path(tmp) / "requests.tsv"
        body.write_bytes(b"\x00" + struct.pack(">I", len(request)) + request)  # one uncompressed gRPC frame
        cmd = [H2LOAD, "-c", "1", "-m", str(concurrency), "-D", str(duration), "-d", str(body), "--log-file", str(log),
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               f"http://127.0.0.1:{port}/{SERVICE}/Predict"]
        cpu0, started = process_cpu_s(pid), time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=True).stdout
        cpu = process_cpu_s(pid) - cpu0
        # per request: start (us since the epoch), HTTP status, us to the end of the response
        times_ms = [int(line.split("\t")[2]) / 1e3 for line in log.read_text().splitlines() if line.strip()]
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if done is None or not times_ms:
        raise RuntimeError(f"cannot read h2load's report:\n{out}")
    succeeded, failed = int(done.group(2)), int(done.group(3))
    data = re.search(r"\((\d+)\) data", out)
    if failed or not succeeded or data is None or int(data.group(1)) < succeeded * response_bytes:
        raise RuntimeError(f"h2load: {failed} of {done.group(1)} requests failed, or some answered with less than "
                           f"a response ({response_bytes} bytes each):\n{out}")
    elapsed = min(duration, time.perf_counter() - started)
    return {"requests_per_s": succeeded / elapsed, "requests": succeeded, "p50_ms": statistics.median(times_ms),
            "server_cpu_ms_per_call": cpu / succeeded * 1e3}


def ceilings(*, ort_p50_ms: float, ort_best_per_s: float, cores: int, noop_latency_ms: float,
             noop_cpu_ms: float) -> dict:
    """The best ratios any Python gRPC front end can reach against in-process ORT (module doc)."""
    return {"p50_ratio_floor": (ort_p50_ms + noop_latency_ms) / ort_p50_ms,
            "throughput_ratio_ceiling": 1.0 / (1.0 + ort_best_per_s * noop_cpu_ms / 1e3 / cores)}


def echo_server(response: bytes, ports) -> None:
    """A grpc.aio server (run in its own process) answering every Predict with ``response``'s bytes,
    without parsing the request: its port goes to the ``ports`` queue."""
    async def predict(request: bytes, context) -> bytes:
        return response

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1)])
        handler = grpc.unary_unary_rpc_method_handler(predict, request_deserializer=None, response_serializer=None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Predict": handler}),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())
