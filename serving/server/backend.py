"""Backends run a model's forward pass on a batch; the gateway handles everything around it.

`Backend` is the interface; `OnnxRuntimeBackend` runs ONNX Runtime inside the gateway process (the
default: nothing else to install). The interface is async so that a remote backend (Triton over
gRPC, next) fits it unchanged: ``infer`` awaits a network call there and a worker thread here.
What a backend must provide:

- ``metadata``: the model as its manifest describes it (`ModelMetadata`), never read from the graph;
- ``await load()``: make the model runnable and warm it up; afterwards ``ready`` is True;
- ``await infer(batch, outputs, deadline)``: ``batch`` holds the images as the graph takes them
  (``metadata.input_dtype``: uint8 ``[N, H, W, C]`` pixels, or float32 ``[N, C, H, W]`` RGB in [0, 1]),
  ``outputs`` the output tensor names wanted (only those are moved), ``deadline`` the latest of
  the batch's request deadlines (a ``time.perf_counter()`` value, None for none); returns ``{name: array [N, ...]}`` for
  exactly those names (a remote server may answer in any order: outputs are always addressed by name);
- ``ready`` and ``not_ready_reason``: whether requests can run now (a remote server can go away and
  come back after `load`; the gateway reports not-ready meanwhile) and, when not, why;
- ``max_batch_size``: the largest batch ``infer`` accepts (the batcher never exceeds it);
- ``concurrent_batches``: how many ``infer`` calls may run at once (1 in process; a remote server
  that queues and schedules work itself can take several);
- ``await close()``: release the model; called only after every request on it has finished.

Backends are created by name from `BACKENDS` (`create_backend`); registering a name twice raises.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np

from parsimony import onnxrt
from parsimony.spec import INPUT_NAME
from serving.server.config import default
from serving.server.errors import ModelLoadError
from serving.server.metadata import ModelMetadata

log = logging.getLogger("serving.server")
ORT_TYPES = {"uint8": "uint8", "float32": "float"}  # ONNX Runtime's names of the image input's element types


class Backend(abc.ABC):
    """One loaded model version behind the gateway (see the module doc for the contract)."""

    kind: ClassVar[str]
    concurrent_batches: ClassVar[int] = 1

    def __init__(self, metadata: ModelMetadata, *, max_batch_size: int) -> None:
        self.metadata = metadata
        self.max_batch_size = max_batch_size

    @abc.abstractmethod
    async def load(self) -> None: ...

    @property
    @abc.abstractmethod
    def ready(self) -> bool: ...

    @property
    def not_ready_reason(self) -> str:
        return "" if self.ready else "the model is still loading"

    @abc.abstractmethod
    async def infer(self, batch: np.ndarray, outputs: Sequence[str],
                    deadline: float | None = None) -> dict[str, np.ndarray]: ...

    async def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        pass


BACKENDS: dict[str, Callable[..., Backend]] = {}


def register_backend(kind: str):
    def add(cls):
        if kind in BACKENDS:
            raise ValueError(f"backend {kind!r} is registered twice ({BACKENDS[kind]} and {cls})")
        cls.kind = kind
        BACKENDS[kind] = cls
        return cls

    return add


def create_backend(kind: str, version_dir: Path, metadata: ModelMetadata, **options) -> Backend:
    """The backend ``kind`` for the model version in ``version_dir`` (options go to its constructor)."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[kind](version_dir, metadata, **options)


@register_backend("onnxruntime")
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime (CPU) in this process; forward passes run one at a time on a worker thread.

    One session runs one batch at a time with ``threads`` intra-op threads (0: ONNX Runtime's
    default, one per physical core): on a CPU, running two batches concurrently only makes them
    compete for the same cores, while one larger batch uses them better. ONNX Runtime releases the
    GIL while it runs, so the event loop keeps decoding and answering requests meanwhile.

    ONNX Runtime runs every node of a graph whatever outputs a run asks for, so a final graph runs
    in sessions over the graph pruned to the outputs a batch asks for (`parsimony.onnxrt.prune`):
    unrequested probability maps, float16 copies and logits cost nothing. The session of the
    default call (every task's primary field in float32) is made and warmed up at load; others are
    made on first use (on the worker thread, so the event loop never waits for them) and the
    ``max_sessions`` most recently used are kept. A raw graph runs in one session over the whole
    graph, as it always did.

    ONNX Runtime's intra-op threads busy-wait for work ("spinning") between ops and, by default,
    for a while after a run. Between ops that is what makes a forward pass fast (a sleeping thread
    takes tens of microseconds to wake, once per parallel op); after a run it burns the cores that
    the event loop, the gRPC threads and other processes need between forward passes (on a loaded
    2-core machine it made a thread hand-off cost ~3 ms instead of ~0.2 ms). ``spinning``:
    ``"run"`` (the default) spins within a forward pass and stops when it returns
    (``session.force_spinning_stop``), ``"always"`` is ONNX Runtime's default, ``"never"`` sleeps
    between ops too.
    """

    max_sessions = 8  # pruned sessions of a final graph kept (each holds the weights it needs)

    def __init__(self, version_dir: Path, metadata: ModelMetadata, *, max_batch_size: int = default("max_batch"),
                 threads: int = default("threads"), spinning: str = default("ort_spinning"),
                 warmup_batch_sizes: Sequence[int] = default("warmup_batch_sizes")) -> None:
        super().__init__(metadata, max_batch_size=max_batch_size)
        self.path = Path(version_dir) / metadata.onnx_file
        self.threads = threads
        if spinning not in onnxrt.SPINNING:
            raise ValueError(f"spinning must be one of {list(onnxrt.SPINNING)}, not {spinning!r}")
        self.spinning = spinning
        self.warmup_batch_sizes = tuple(b for b in warmup_batch_sizes if b <= max_batch_size)
        self._session = None  # the whole raw graph, or the final graph pruned to the default call's outputs
        self._default: tuple[str, ...] | None = None  # the outputs _session computes (None: every one)
        self._pruned: collections.OrderedDict[tuple[str, ...], object] = collections.OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{metadata.name}")

    async def load(self) -> None:
        if not self.path.is_file():
            raise ModelLoadError(
                f"{self.path} does not exist: the embedded backend runs ONNX models; convert the run with "
                f"`python -m serving.convert RUN_DIR --format onnx` (or --format python), or serve a "
                f"TensorRT version through Triton"
            )
        meta = self.metadata
        if meta.final:
            self._default = tuple(name for t in meta.tasks for _, name in meta.outputs_for(t, "float32", False))
        loop = asyncio.get_running_loop()
        self._session = await loop.run_in_executor(self._executor, self._create_session)
        started = time.perf_counter()
        for batch in self.warmup_batch_sizes:
            await self.infer(meta.blank_batch(batch), self._default or meta.io_spec.output_names)
        log.info("loaded %s version %d with ONNX Runtime (%s threads), warmed up in %.2f s",
                 meta.name, meta.version, self.threads or "default", time.perf_counter() - started)

    def _create_session(self):
        if self._default is not None:
            self._check_outputs()
        try:
            session = onnxrt.session(self.path, threads=self.threads, spinning=self.spinning, outputs=self._default)
        except Exception as exc:  # ORT raises its own exception types for unreadable or invalid graphs
            raise ModelLoadError(f"ONNX Runtime cannot load {self.path}: {exc}; re-export the model") from exc
        self._check_graph(session)
        return session

    def _check_outputs(self) -> None:
        """A final graph's sessions see only the outputs they compute: check the graph's own list."""
        import onnx

        try:
            graph = onnx.load(str(self.path), load_external_data=False).graph
        except Exception as exc:  # protobuf's DecodeError and onnx's own errors
            raise ModelLoadError(f"cannot load {self.path}: not a readable ONNX graph ({exc}); re-export the model") \
                from exc
        missing = [n for n in self.metadata.io_spec.output_names if n not in {o.name for o in graph.output}]
        if missing:
            raise ModelLoadError(f"{self.path} does not match its manifest: outputs missing from the graph "
                                 f"{missing}; the version folder mixes two exports, re-convert it")

    def _check_graph(self, session) -> None:
        inputs = [(i.name, i.type) for i in session.get_inputs()]
        outputs = {o.name for o in session.get_outputs()}
        missing = [n for n in self._default or self.metadata.io_spec.output_names if n not in outputs]
        want = [(INPUT_NAME, f"tensor({ORT_TYPES[self.metadata.input_dtype]})")]
        if inputs != want or missing:
            raise ModelLoadError(
                f"{self.path} does not match its manifest: graph inputs {inputs} (want {want}), "
                f"outputs missing from the graph {missing}; the version folder mixes two exports, re-convert it"
            )

    @property
    def ready(self) -> bool:
        return self._session is not None

    async def infer(self, batch: np.ndarray, outputs: Sequence[str],
                    deadline: float | None = None) -> dict[str, np.ndarray]:
        names = list(outputs)  # a forward pass cannot be interrupted: the batcher expires late requests
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._run, names, batch)
        return dict(zip(names, results, strict=True))

    def _run(self, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
        """On the worker thread: run the session that computes exactly ``names`` (made on first use)."""
        return self._session_for(tuple(names)).run(names, {INPUT_NAME: batch})

    def _session_for(self, names: tuple[str, ...]):
        if self._default is None or set(names) == set(self._default):
            return self._session
        key = tuple(sorted(names))
        session = self._pruned.get(key)
        if session is None:
            session = onnxrt.session(self.path, threads=self.threads, spinning=self.spinning, outputs=key)
            if len(self._pruned) >= self.max_sessions:
                self._pruned.popitem(last=False)
        self._pruned[key] = session
        self._pruned.move_to_end(key)
        return session

    async def close(self) -> None:
        self._session = None
        self._pruned.clear()
        self._executor.shutdown(wait=False)
