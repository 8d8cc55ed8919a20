"""Triton against in-process ONNX Runtime: what serving the compact model through Triton costs.

    python -m benchmarks.triton                    # the demo-sized model, full measurement
    python -m benchmarks.triton --quick            # a smoke test of about a minute
    python -m benchmarks.triton --run runs/demo --json triton.json   # an exported run instead

Both paths run the same ``model.onnx``:

- **Triton**: the server bundled in ``nvidia-pytriton`` (``.venv-triton``, `serving.triton_process`)
  serves the python-backend model that ``python -m serving.convert RUN --format python`` writes
  (ONNX Runtime inside the stub process, one CPU instance, dynamic batching up to ``--max-batch``
  with the converter's 100 µs queue delay). Requests go over tritonclient gRPC, one shared client,
  batch 1, the outputs the gateway asks for by default requested and decoded to numpy (a final
  graph's answers; a raw graph's head outputs).
- **in-process**: one ``onnxruntime.InferenceSession`` in this process over the whole graph (as the
  python backend's), called with the same batch-1 image and asked for the same outputs. At concurrency 8, eight threads share the session; as a reference, one caller also runs
  whole batches (the best of the preferred batch sizes), which is what the dynamic batcher aims at.

ONNX Runtime gets the same threads in both paths: ``--threads`` intra-op threads (default: every
core this process may use), sequential execution, CPUExecutionProvider (the converter's
``--threads`` sets the python backend's ``intra_op_num_threads``). Client, server and the
in-process session share the machine's cores, as a sidecar deployment would.

Measured: latency at concurrency 1 (p50, p99 over every request of every round), and throughput
(images/s) and per-request p50 latency at concurrency 8, closed loop (each worker sends its next
request when the previous one returns). Load on a shared machine drifts, so the paths alternate:
each round measures Triton and in-process back to back, in reversed order every other round, and
the table pools the rounds. Before timing, Triton's outputs are checked against the in-process ones.

Model: without ``--run``, the demo's model (``tiny`` encoder, synthetic-scenes tasks: segmentation,
depth, normal; 96x128), untrained: 50 % of its encoder channels zeroed at random and compacted
(round_to 8), as in `benchmarks.compaction` (weights do not change the cost), then exported with
`export_onnx` and a manifest, as ``training.export`` does: the final graph (uint8 pixels in, the
answers out), or with ``--raw-outputs`` the raw one (`benchmarks._final_models`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from benchmarks._final_models import CASES, call_outputs, export_pair, metadata
from benchmarks._timing import configure_logging
from parsimony import onnxrt
from parsimony.io import atomic_write_json
from serving.convert import ConvertError, ExportedModel, convert, load_export
from serving.triton_config import ServingOptions, preferred_batch_sizes
from serving.triton_process import TritonInstall, TritonUnavailable, start_tritonserver
from training.timing import sample_ms

log = logging.getLogger("benchmarks.triton")
MODEL_NAME = "bench"
PATHS = {"ort": "in-process ONNX Runtime", "triton": "Triton, python backend (gRPC)"}
Call = Callable[[np.ndarray], object]


@dataclass(frozen=True)
class Settings:
    rounds: int
    requests: int  # concurrency-1 requests per path per round
    seconds: float  # closed-loop seconds per path (and per reference batch size) per round
    concurrency: int
    threads: int
    max_batch: int
    warmup: int
    reference_batches: tuple[int, ...]


@dataclass
class Tally:
    """One path's pooled measurements over all rounds."""

    single_ms: list[float] = field(default_factory=list)  # concurrency 1
    loaded_ms: list[float] = field(default_factory=list)  # per request, closed loop
    images: int = 0
    seconds: float = 0.0

    def add_load(self, images: int, seconds: float, ms: list[float]) -> None:
        self.images, self.seconds = self.images + images, self.seconds + seconds
        self.loaded_ms += ms

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


# --- the model --------------------------------------------------------------------------------


def build_demo_run(directory: Path, seed: int = 0, raw_outputs: bool = False) -> Path:
    """An exported run (``model.onnx``, ``manifest.json``) of the demo model (module doc): the final
    graph, or with ``raw_outputs`` the raw one."""
    export_pair("demo", CASES["demo"].image_size, {"raw" if raw_outputs else "final": directory}, seed)
    return directory


def example_images(export: ExportedModel, batch: int, seed: int = 0) -> np.ndarray:
    """A batch of random images as the graph takes them: uint8 pixels, or float32 in [0, 1)."""
    image = export.spec.inputs[0]
    rng = np.random.default_rng(seed)
    if image.dtype == "uint8":
        return rng.integers(0, 256, image.concrete_shape(batch), dtype=np.uint8)
    return rng.random(image.concrete_shape(batch), dtype=np.float32)


def requested_outputs(export: ExportedModel) -> list[str]:
    """What both paths ask for: the gateway's default call (`benchmarks._final_models.call_outputs`:
    each task's answer from a final graph; every head output from a raw one)."""
    return list(call_outputs(metadata(export.directory, MODEL_NAME)))


# --- the two paths ----------------------------------------------------------------------------


def ort_call(export: ExportedModel, threads: int) -> Call:
    """A session configured as the python backend's (its config carries `parsimony.onnxrt.session_settings`;
    like the python backend's, over the whole graph, asked for the same outputs)."""
    session = onnxrt.session(export.onnx_path, threads=threads)
    name, outputs = export.spec.input_names[0], requested_outputs(export)
    return lambda images: session.run(outputs, {name: images})


def triton_call(client: grpcclient.InferenceServerClient, export: ExportedModel) -> Call:
    name, outputs = export.spec.input_names[0], requested_outputs(export)
    requested = [grpcclient.InferRequestedOutput(o) for o in outputs]

    def call(images: np.ndarray) -> list[np.ndarray]:
        tensor = grpcclient.InferInput(name, list(images.shape), np_to_triton_dtype(images.dtype))
        tensor.set_data_from_numpy(images)
        result = client.infer(MODEL_NAME, [tensor], outputs=requested)
        return [result.as_numpy(o) for o in outputs]

    return call


def check_agreement(paths: dict[str, Call], images: np.ndarray, rtol: float = 1e-4) -> None:
    """Refuse to time two paths that do not compute the same outputs."""
    want, got = paths["ort"](images), paths["triton"](images)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        w, g = w.astype(np.float64), g.astype(np.float64)
        bound = rtol * max(float(np.abs(w).max()), 1e-6)
        if g.shape != w.shape or float(np.abs(g - w).max()) > bound:
            raise RuntimeError(f"Triton's output {i} differs from in-process ONNX Runtime; refusing to time it")


# --- measuring --------------------------------------------------------------------------------


def closed_loop(call: Call, images: np.ndarray, workers: int, seconds: float) -> tuple[int, float, list[float]]:
    """``workers`` threads send ``images`` back to back for ``seconds``: (images done, elapsed s, ms per call)."""
    start = time.perf_counter()
    deadline = start + seconds

    def worker(_: int) -> tuple[list[float], float]:
        times = []
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            call(images)
            times.append(1e3 * (time.perf_counter() - t0))
        return times, time.perf_counter()

    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(worker, range(workers)))
    ms = [t for times, _ in done for t in times]
    return len(ms) * len(images), max(end for _, end in done) - start, ms


class BatchCounter:
    """Triton's own count of requests and executions of the model, over the loaded phases."""

    def __init__(self, client: grpcclient.InferenceServerClient) -> None:
        self.client, self.requests, self.executions = client, 0, 0

    def _now(self) -> tuple[int, int]:
        stats = self.client.get_inference_statistics(MODEL_NAME).model_stats[0]
        return stats.inference_count, stats.execution_count

    def around(self, fn: Callable[[], object]) -> object:
        before = self._now()
        out = fn()
        after = self._now()
        self.requests, self.executions = self.requests + after[0] - before[0], self.executions + after[1] - before[1]
        return out


def warm_up(paths: dict[str, Call], one: np.ndarray, s: Settings) -> None:
    for call in paths.values():
        sample_ms(lambda call=call: call(one), repeats=s.warmup, warmup=0)
        closed_loop(call, one, s.concurrency, 0.5)


def measure_round(r: int, paths: dict[str, Call], tallies: dict[str, Tally], images: dict[int, np.ndarray],
                  s: Settings, counter: BatchCounter) -> None:
    """One round: concurrency 1 for each path, then the closed loop for each, then the batched reference."""
    order = list(paths) if r % 2 == 0 else list(reversed(paths))
    for name in order:
        tallies[name].single_ms += sample_ms(lambda name=name: paths[name](images[1]), repeats=s.requests, warmup=0)
    for name in order:
        run = lambda name=name: closed_loop(paths[name], images[1], s.concurrency, s.seconds)  # noqa: E731
        tallies[name].add_load(*(counter.around(run) if name == "triton" else run()))
    for batch in s.reference_batches:
        tallies[f"ort-b{batch}"].add_load(*closed_loop(paths["ort"], images[batch], 1, s.seconds))


def measure(paths: dict[str, Call], export: ExportedModel, s: Settings, counter: BatchCounter) -> dict[str, Tally]:
    from tqdm import tqdm

    images = {b: example_images(export, b) for b in {1, *s.reference_batches}}
    tallies = {name: Tally() for name in [*paths, *(f"ort-b{b}" for b in s.reference_batches)]}
    warm_up(paths, images[1], s)
    bar = tqdm(total=s.rounds, desc="rounds", disable=not sys.stderr.isatty(), file=sys.stderr)
    for r in range(s.rounds):
        measure_round(r, paths, tallies, images, s, counter)
        bar.update()
        if bar.disable:
            log.info("after round %d/%d: %s", r + 1, s.rounds, ", ".join(
                f"{k} {np.median(t.single_ms):.2f} ms, {t.throughput:.0f} img/s" for k, t in tallies.items() if k in paths))
    bar.close()
    return tallies


# --- the report -------------------------------------------------------------------------------


def summarise(tallies: dict[str, Tally], counter: BatchCounter) -> dict:
    paths = {k: {"p50_ms": float(np.percentile(t.single_ms, 50)), "p99_ms": float(np.percentile(t.single_ms, 99)),
                 "loaded_p50_ms": float(np.percentile(t.loaded_ms, 50)), "throughput": t.throughput,
                 "requests": len(t.single_ms)} for k, t in tallies.items() if k in PATHS}
    reference = {int(k.removeprefix("ort-b")): t.throughput for k, t in tallies.items() if k.startswith("ort-b")}
    ratios = {key: paths["triton"][key] / paths["ort"][key] for key in ("p50_ms", "p99_ms", "loaded_p50_ms", "throughput")}
    mean_batch = counter.requests / counter.executions if counter.executions else float("nan")
    return {"paths": paths, "ratios": ratios, "reference_throughput": reference, "triton_mean_batch": mean_batch}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores available ({os.cpu_count()} online), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def environment(install: TritonInstall, client: grpcclient.InferenceServerClient, export: ExportedModel,
                argv: list[str]) -> dict:
    probe = [str(install.venv / "bin" / "python"), "-c", "import onnxruntime; print(onnxruntime.__version__)"]
    triton_ort = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    manifest = export.manifest
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", "-m", "benchmarks.triton", *argv]), "machine": machine(),
            "onnxruntime": ort.__version__, "triton_onnxruntime": triton_ort,
            "tritonserver": client.get_server_metadata().version, "tritonclient": version("tritonclient"),
            "model": manifest.model_name,
            "source": manifest.extra.get("benchmark") or f"run {export.directory}",
            "image_size": list(export.manifest.image_size),
            "parameters": manifest.complexity.parameters, "macs": manifest.complexity.macs,
            "outputs": requested_outputs(export), "graph": "final" if export.manifest.final else "raw"}


def table(summary: dict, s: Settings) -> str:
    p, r = summary["paths"], summary["ratios"]
    c = s.concurrency
    lines = [f"| path | p50 ms, c=1 | p99 ms, c=1 | p50 ms, c={c} | throughput img/s, c={c} |", "|---|---|---|---|---|"]
    for key, label in PATHS.items():
        x = p[key]
        lines.append(f"| {label} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['loaded_p50_ms']:.2f} | {x['throughput']:.0f} |")
    lines.append(f"| **Triton ÷ in-process** | {r['p50_ms']:.2f}× | {r['p99_ms']:.2f}× | {r['loaded_p50_ms']:.2f}× | "
                 f"{r['throughput']:.2f}× |")
    batch, best = max(summary["reference_throughput"].items(), key=lambda kv: kv[1])
    lines.append(f"| in-process ONNX Runtime, batch {batch}, one caller (reference) | — | — | — | {best:.0f} |")
    return "\n".join(lines)


def report(env: dict, summary: dict, s: Settings) -> str:
    h, w = env["image_size"]
    tried = ", ".join(f"{b}: {v:.0f}" for b, v in summary["reference_throughput"].items())
    return "\n".join([
        f"### Triton (python backend) against in-process ONNX Runtime: {env['model']}, {h}x{w}", "",
        f"- {env['date']}; `{env['command']}`",
        f"- {env['machine']}; client, server and in-process session share these cores",
        f"- model: {env['source']}, {env['parameters'] / 1e6:.3f} M parameters, {env['macs'] / 1e9:.3f} GMACs/image, "
        f"{env['graph']} graph, outputs {', '.join(env['outputs'])} requested (what the gateway asks for by default)",
        f"- onnxruntime {env['onnxruntime']} in-process, {env['triton_onnxruntime']} in Triton's python backend; "
        f"tritonserver {env['tritonserver']}, tritonclient {env['tritonclient']} (gRPC); CPUExecutionProvider, "
        f"**{s.threads} intra-op thread(s) in both paths**, sequential execution",
        f"- Triton: `serving.convert --format python --threads {s.threads} --max-batch {s.max_batch}`, one CPU "
        f"instance, dynamic batching (preferred {preferred_batch_sizes(s.max_batch)}, "
        f"{serving_options(s).queue_delay_us} µs queue delay); "
        f"at c={s.concurrency} it ran {summary['triton_mean_batch']:.2f} requests per execution on average",
        f"- {s.rounds} alternating rounds; per round and path {s.requests} requests at c=1, then {s.seconds:g} s "
        f"closed loop at c={s.concurrency} (in-process: {s.concurrency} threads sharing one session), batch-1 "
        f"requests; reference: one caller, whole batches, {s.seconds:g} s per batch size per round (img/s {tried})",
        "", table(summary, s), ""])


# --- entry point ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="an exported run (model.onnx, manifest.json); default: build the demo model")
    p.add_argument("--quick", action="store_true", help="2 short rounds: a smoke test of about a minute")
    p.add_argument("--raw-outputs", action="store_true", help="build the demo model's raw graph instead of its final one")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 6; --quick 2)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="ONNX Runtime intra-op threads, in both paths (default: all available cores)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight for the throughput column")
    p.add_argument("--max-batch", type=int, default=8, help="Triton's max batch size; the reference's largest batch")
    p.add_argument("--json", type=Path, help="also write the environment, settings and results here")
    args = p.parse_args(argv)
    if min(args.threads, args.concurrency, args.max_batch, args.rounds or 1) < 1:
        p.error("--threads, --concurrency, --max-batch and --rounds must be positive")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    batches = (args.max_batch,) if quick else tuple(preferred_batch_sizes(args.max_batch)) or (1,)
    return Settings(rounds=args.rounds or (2 if quick else 6), requests=40 if quick else 200,
                    seconds=2.0 if quick else 5.0, concurrency=args.concurrency, threads=args.threads,
                    max_batch=args.max_batch, warmup=5 if quick else 20, reference_batches=batches)


def serving_options(s: Settings) -> ServingOptions:
    return ServingOptions(format="python", max_batch=s.max_batch, intra_op_threads=s.threads)


def benchmark(args: argparse.Namespace, argv: list[str], s: Settings, tmp: Path) -> tuple[dict, dict]:
    install = TritonInstall.locate()  # before building anything: a missing server fails fast
    run = args.run or build_demo_run(tmp / "run", raw_outputs=args.raw_outputs)
    export = load_export(run)
    convert(run, tmp / "model_repository", MODEL_NAME, serving_options(s))
    with start_tritonserver(tmp / "model_repository", extra_args=("--disable-auto-complete-config",)) as server, \
            grpcclient.InferenceServerClient(server.grpc_url) as client:
        paths = {"ort": ort_call(export, s.threads), "triton": triton_call(client, export)}
        check_agreement(paths, example_images(export, 2, seed=1))
        env = environment(install, client, export, argv)
        counter = BatchCounter(client)
        summary = summarise(measure(paths, export, s, counter), counter)
    return env, summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configure_logging()
    s = settings_from(args)
    try:
        with tempfile.TemporaryDirectory(prefix="triton-bench-") as tmp:
            env, summary = benchmark(args, argv, s, Path(tmp))
    except (TritonUnavailable, ConvertError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(env, summary, s))
    if args.json:
        atomic_write_json(args.json, {"env": env, "settings": asdict(s), "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
