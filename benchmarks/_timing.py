"""Measurement helpers for `benchmarks.compaction`: one CPU configuration per fresh process, ONNX
Runtime op-type profiles, and CUDA fp16 / CUDA-graph timing.

    python -m benchmarks._timing '{"backend": "ort", "path": "model.onnx", ...}'   # one JSON line

Why a fresh process per CPU configuration: peak memory is read from the kernel's high-water mark
of resident memory (``VmHWM`` in /proc/self/status, the counter behind getrusage's ``ru_maxrss``),
which only grows within a process, and the allocators (glibc, PyTorch's CPU allocator, ONNX
Runtime's arena) keep what they freed, so a second configuration in one process would inherit the
first's footprint. tracemalloc cannot see tensor memory at all. The worker imports its runtime
(the ORT worker never imports torch) and records its RSS; loads the model; returns freed heap pages
to the OS and resets the high-water mark to the current RSS (writes 5 to /proc/self/clear_refs,
Linux >= 4.0), so load-time copies are excluded; runs the warm-up and timed passes; and reports
``peak = VmHWM - RSS after imports``: the loaded weights (in ORT, their prepacked form) plus the
peak of activations, workspaces and arena growth during inference, and the runtime's first-use
allocations (a few MB: thread pools, kernel caches; alike for dense and compact). Without
/proc/self/clear_refs the load-time transients count too.

Latency is the median wall time of ``repeats`` calls (at least ``min_time`` seconds of calls)
after ``warmup`` calls, with ``threads`` intra-op threads in both runtimes.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from parsimony import onnxrt
from training.timing import median_ms


def configure_logging() -> None:
    """A benchmark's own progress lines on stderr; the training package's INFO lines (exports,
    compaction reports) would drown them, so only its warnings show."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("training").setLevel(logging.WARNING)

CONV_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose"})


@dataclass(frozen=True)
class Job:
    """One CPU configuration: ``path`` is a model directory (eager) or an .onnx file (ort)."""

    backend: str  # "eager" | "ort"
    path: str
    image_size: tuple[int, int]
    batch: int
    threads: int
    warmup: int = 2
    repeats: int = 5
    min_time: float = 1.0
    profile_runs: int = 0  # > 0: profile ORT op types over this many runs instead of timing


def measure(job: Job) -> dict:
    """Run ``job`` in a fresh interpreter (see the module doc) and return its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks._timing", json.dumps(asdict(job))]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({job.backend}, {job.path}, batch {job.batch}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- memory -----------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kb() -> int:
    """Current resident set size (KiB); the high-water mark where /proc is missing."""
    import resource

    return _proc_status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kb() -> int:
    import resource

    return _proc_status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``): memory a loader freed (ORT drops
    its initializers after prepacking them) would otherwise stay resident in one run and not in
    the next, depending on which thread's malloc arena held it (a bimodal ~20 % swing)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def reset_peak_rss() -> bool:
    """Lower the high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --- the worker -------------------------------------------------------------------------------


def _eager_runner(job: Job) -> Callable[[], object]:
    import torch

    from training.compaction import load_compact

    torch.set_num_threads(job.threads)
    model = load_compact(job.path).eval()
    x = torch.rand(job.batch, 3, *job.image_size, generator=torch.Generator().manual_seed(0))

    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def _ort_runner(job: Job) -> Callable[[], object]:
    session = onnxrt.session(job.path, threads=job.threads)
    x = np.random.default_rng(0).random((job.batch, 3, *job.image_size), dtype=np.float32)
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def _import_runtime(backend: str) -> None:
    """Import the runtime before the baseline RSS is read: torch alone is ~0.5 GB of RSS."""
    if backend == "eager":
        import torch  # noqa: F401

        import training.compaction  # noqa: F401
    else:
        import onnxruntime  # noqa: F401


def run_job(job: Job) -> dict:
    """Measure one configuration in this process (the worker's body)."""
    if job.profile_runs:
        return {"profile_ms": ort_profile(job)}
    _import_runtime(job.backend)
    base = rss_kb()
    run = (_eager_runner if job.backend == "eager" else _ort_runner)(job)
    trim_heap()
    exact_peak = reset_peak_rss()
    ms = median_ms(run, warmup=job.warmup, repeats=job.repeats, min_time=job.min_time)
    return {"ms": ms, "peak_mb": (peak_rss_kb() - base) / 1024, "peak_excludes_load": exact_peak}


def ort_profile(job: Job) -> dict[str, float]:
    """ms per run by category (Conv in the encoder, Conv in the heads, Resize, other), from ORT's
    own profiler: node kernel times of ``profile_runs`` runs after ``warmup`` unprofiled ones."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        session = onnxrt.session(job.path, threads=job.threads, profile=Path(tmp) / "ort")
        x = np.random.default_rng(0).random((job.batch, 3, *job.image_size), dtype=np.float32)
        feed = {session.get_inputs()[0].name: x}
        for _ in range(job.warmup + job.profile_runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = runs[job.warmup]  # skip the warm-up runs (first-run allocations, prepacking)
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            totals[_category(e["name"], e["args"].get("op_name", ""))] += e["dur"] / 1e3 / job.profile_runs
    return dict(totals)


def _category(node: str, op: str) -> str:
    if op in CONV_OPS:
        return "Conv (encoder)" if "/encoder/" in node else "Conv (heads)"
    return "Resize" if op == "Resize" else "other"


# --- CUDA (in-process: the caching allocator's own peak statistics are exact) -----------------


def cuda_measure(model, image_size: tuple[int, int], batch: int, *, graph: bool, warmup: int, repeats: int,
                 min_time: float) -> dict:
    """fp16 (``.half()``, in place: pass a model of your own) latency on the current CUDA device,
    eager or replaying a CUDA graph of the forward; each call is synchronised. Peak = max allocated
    during the runs minus allocated before the model was moved to the GPU (weights + activations,
    not the allocator's cache)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        forward = _cuda_forward(model.cuda().half().eval(), image_size, batch, graph)

        def synced() -> None:
            forward()
            torch.cuda.synchronize()

        ms = median_ms(synced, warmup=warmup, repeats=repeats, min_time=min_time)
    return {"ms": ms, "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}


def _cuda_forward(model, image_size: tuple[int, int], batch: int, graph: bool) -> Callable[[], object]:
    """``model`` on a fixed fp16 batch, or the replay of a CUDA graph capturing that call."""
    import torch

    x = torch.rand(batch, 3, *image_size, device="cuda").half()
    if not graph:
        return lambda: model(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graph asks
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        model(x)

    def replay() -> object:
        cuda_graph.replay()
        return x  # the closure keeps the captured input alive: the graph reads its memory

    return replay


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    spec["image_size"] = tuple(spec["image_size"])
    print(json.dumps(run_job(Job(**spec))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
