"""Load generation against the gateway, as a library: `run_load` (blocking) or `load` (a coroutine).

Two disciplines, both on one asyncio event loop with `AsyncClient`, so the generator itself stays
light next to the server:

- **closed loop** (no ``rate``): ``concurrency`` workers, each sending its next request as soon as
  its previous one is answered. Measures capacity: throughput at a given number of requests in flight.
- **open loop** (``rate`` requests/s): arrivals on a fixed schedule, Poisson (exponential gaps) or
  ``uniform`` (equal gaps), independent of how fast the server answers, which is how latency under
  a given offered load must be measured (a closed loop slows down with the server and hides its
  queueing). ``concurrency`` caps the requests outstanding: an arrival over the cap is *dropped*
  (counted, not sent); one sent more than ``late_ms`` after its scheduled time is *late* (the
  generator could not keep up).

Both stop issuing at ``duration`` seconds and/or after ``requests`` requests (arrivals, in the open
loop), whichever comes first, then wait for the requests in flight. Each request has its own
deadline (``timeout``) and, by default, no retries, so every failure is counted by its code.

The report (a dict, JSON-ready)::

    mode, concurrency, rate_rps, arrivals, duration_s, requests_limit   what was asked
    server, protocol, model, model_version                              where it went
    elapsed_s        from the first request to the last answer
    sent, ok, error_count, errors {code: n}, dropped, late              sent == ok + error_count
    throughput_rps   ok / elapsed_s
    latency_ms       client-side, successful requests: p50, p90, p99, max, mean
    server_ms        medians of the server's stage timings (decode_ms ... total_ms), batch_size_mean
"""

from __future__ import annotations

import asyncio
import collections
import io
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from clients.calls import ImageInput
from clients.cli import choose_model
from clients.client import DEFAULT_TIMEOUT, AsyncClient
from clients.errors import ClientError
from clients.retry import NO_RETRY
from clients.types import ModelInfo, Prediction
from parsimony.wire import STAGE_FIELDS

ARRIVALS = ("poisson", "uniform")
Progress = Callable[[dict], None]


@dataclass
class Recorder:
    """What happened to each request, and when the run started and ended."""

    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    batch_sizes: list[int] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    sent: int = 0
    dropped: int = 0
    late: int = 0
    version: int | None = None

    def ok(self, latency_ms: float, p: Prediction) -> None:
        self.latencies_ms.append(latency_ms)
        for stage in STAGE_FIELDS:
            self.stages[stage].append(p.timings[stage])
        self.batch_sizes.append(p.batch_size)
        self.version = p.version

    def snapshot(self) -> dict:
        return {"elapsed_s": time.perf_counter() - self.started, "sent": self.sent, "ok": len(self.latencies_ms),
                "error_count": sum(self.errors.values()), "dropped": self.dropped}


class Budget:
    """The bound on issuing: a time limit and/or a count."""

    def __init__(self, duration: float | None, requests: int | None, start: float) -> None:
        self.stop_at = None if duration is None else start + duration
        self.left = requests

    def take(self, at: float | None = None) -> bool:
        """Whether one more request may be issued (at time ``at``, default now); counts it."""
        at = time.perf_counter() if at is None else at
        if (self.stop_at is not None and at >= self.stop_at) or self.left == 0:
            return False
        if self.left is not None:
            self.left -= 1
        return True


async def _one(client: AsyncClient, model: str, image: ImageInput, options: dict, rec: Recorder) -> None:
    rec.sent += 1
    start = time.perf_counter()
    try:
        p = await client.predict(model, image, **options)
    except ClientError as exc:
        rec.errors[exc.code] += 1
    else:
        rec.ok((time.perf_counter() - start) * 1e3, p)


async def _closed(send: Callable, concurrency: int, budget: Budget) -> None:
    async def worker() -> None:
        while budget.take():
            await send()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open(send: Callable, concurrency: int, budget: Budget, rate: float, arrivals: str, late_ms: float,
                seed: int, rec: Recorder) -> None:
    rng, due, in_flight = random.Random(seed), rec.started, set()
    while True:
        due += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
        if not budget.take(due):
            break
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        elif -wait * 1e3 > late_ms:
            rec.late += 1
        if len(in_flight) >= concurrency:
            rec.dropped += 1
            continue
        task = asyncio.create_task(send())
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


async def _report_progress(rec: Recorder, progress: Progress, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        progress(rec.snapshot())


def check_bounds(concurrency: int, duration: float | None, requests: int | None, rate: float | None, arrivals: str) -> None:
    """Refuse a run that is unbounded or cannot run (ValueError saying which setting is wrong)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if duration is None and requests is None:
        raise ValueError("bound the run: give a duration (seconds) and/or a number of requests")
    if (duration is not None and duration <= 0) or (requests is not None and requests < 1):
        raise ValueError(f"duration must be > 0 and requests >= 1 (got {duration}, {requests})")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {arrivals!r}")


async def measure(client: AsyncClient, model: str, image: ImageInput, *, concurrency: int = 8,
                  duration: float | None = 10.0, requests: int | None = None, rate: float | None = None,
                  arrivals: str = "poisson", late_ms: float = 10.0, tasks: Sequence[str] | None = None,
                  output_dtype: str = "float32", timeout: float | None = DEFAULT_TIMEOUT, seed: int = 0,
                  progress: Progress | None = None, progress_interval: float = 1.0) -> dict:
    """Run one bounded load with an open client and return the report (without server/model fields)."""
    check_bounds(concurrency, duration, requests, rate, arrivals)
    rec = Recorder()
    budget = Budget(duration, requests, rec.started)
    options = {"tasks": tasks, "output_dtype": output_dtype, "timeout": timeout}

    def send():
        return _one(client, model, image, options, rec)

    reporter = None if progress is None else asyncio.create_task(_report_progress(rec, progress, progress_interval))
    try:
        if rate is None:
            await _closed(send, concurrency, budget)
        else:
            await _open(send, concurrency, budget, rate, arrivals, late_ms, seed, rec)
    finally:
        if reporter is not None:
            reporter.cancel()
    rec.finished = time.perf_counter()
    asked = {"mode": "closed" if rate is None else "open", "concurrency": concurrency, "rate_rps": rate,
             "arrivals": None if rate is None else arrivals, "duration_s": duration, "requests_limit": requests}
    return asked | summarize(rec)


def summarize(rec: Recorder) -> dict:
    elapsed = (rec.finished or time.perf_counter()) - rec.started
    lat = np.asarray(rec.latencies_ms, np.float64)
    latency = {k: None for k in ("p50", "p90", "p99", "max", "mean")}
    if lat.size:
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        latency = {"p50": p50, "p90": p90, "p99": p99, "max": lat.max(), "mean": lat.mean()}
    server = {s: float(np.median(v)) for s, v in rec.stages.items()}
    if rec.batch_sizes:
        server["batch_size_mean"] = float(np.mean(rec.batch_sizes))
    ok = len(rec.latencies_ms)
    return {"model_version": rec.version, "elapsed_s": elapsed, "sent": rec.sent, "ok": ok,
            "error_count": sum(rec.errors.values()), "errors": dict(sorted(rec.errors.items())),
            "dropped": rec.dropped, "late": rec.late, "throughput_rps": ok / elapsed if elapsed > 0 else 0.0,
            "latency_ms": {k: None if v is None else float(v) for k, v in latency.items()}, "server_ms": server}


def synthetic_image(info: ModelInfo, seed: int = 0) -> bytes:
    """A PNG of random pixels of the model's input size (so the server's decode is part of the load)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (info.height, info.width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


async def load(server: str, model: str | None = None, image: ImageInput | None = None, *, warmup: int = 0,
               protocol: str | None = None, tls=None, retry=NO_RETRY, concurrency: int = 8, **measure_options) -> dict:
    """Connect, pick the model (the only one served, unless named), send ``warmup`` requests unmeasured,
    then `measure`. ``image`` defaults to `synthetic_image`; other options as in `measure`."""
    async with AsyncClient(server, protocol=protocol, tls=tls, retry=retry, timeout=measure_options.get("timeout", DEFAULT_TIMEOUT),
                           connections=concurrency) as client:
        info = choose_model(await client.list_models(), model)
        image = synthetic_image(info) if image is None else image
        for _ in range(warmup):
            await client.predict(info.name, image)
        report = await measure(client, info.name, image, concurrency=concurrency, **measure_options)
        return {"server": client.endpoint.url, "protocol": client.protocol, "model": info.name} | report


def run_load(server: str, model: str | None = None, image: ImageInput | None = None, **options) -> dict:
    """`load` from synchronous code (its own event loop): ``run_load("localhost:50051", "demo", concurrency=16,
    duration=10)``, ``run_load("http://localhost:8080", "demo", "image.png", rate=200, duration=30, concurrency=64)``."""
    return asyncio.run(load(server, model, image, **options))
