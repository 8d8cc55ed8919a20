"""Dynamic batching: concurrent requests for one model share forward passes.

Requests wait in a bounded queue; a worker takes up to ``max_batch`` of them, stacks their images
(as the graph takes them: uint8 pixels or float32) and runs one forward pass for all, asking the
backend for the union of the outputs they asked for and nothing else, then hands each request its
own slice of the outputs it asked for. Why this shape:

- **No waiting when idle.** With ``max_delay`` 0 (the default) a request that finds the worker idle
  runs at once, alone; requests arriving while a batch runs queue up and form the next batch. So
  batch 1 costs no added latency and batches grow exactly as fast as load does. A positive
  ``max_delay`` additionally holds the first request of a batch up to that long for the batch to fill.
- **A bounded queue fails fast.** A request that finds ``max_queue`` requests already waiting is
  refused at once with `QueueFull` (RESOURCE_EXHAUSTED / 429) instead of waiting behind work the
  server cannot finish in time.
- **Deadlines are honoured.** A request whose deadline passes while queued is answered with
  `DeadlineExceeded` and never run; one whose caller gave up (cancelled) is skipped.
- ``concurrency`` batches may run at once: 1 for an in-process CPU backend (two batches would only
  fight over the same cores), more for a remote backend that queues work on its own.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serving.server.backend import Backend
from serving.server.config import default
from serving.server.errors import DeadlineExceeded, QueueFull, ShuttingDown, as_gateway_error


@dataclass(slots=True)
class _Item:
    image: np.ndarray  # one image as the graph takes it (metadata.input_shape, input_dtype)
    outputs: tuple[str, ...]
    future: asyncio.Future
    enqueued: float  # time.perf_counter()
    deadline: float | None  # time.perf_counter() value, or None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One request's share of a batch: its outputs (``[...]`` without the batch dimension) and timing."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    inference_s: float
    batch_size: int


class DynamicBatcher:
    def __init__(self, backend: Backend, *, max_batch: int = default("max_batch"),
                 max_delay_s: float = default("max_queue_delay_ms") / 1e3, max_queue: int = default("max_queue"),
                 concurrency: int = 1, on_batch: Callable[[int], None] | None = None) -> None:
        self.backend = backend
        self.max_batch = max(1, min(max_batch, backend.max_batch_size))
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._output_order = backend.metadata.io_spec.output_names
        self._on_batch = on_batch
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task] = set()
        self._in_batches = 0
        self._closing = False  # no new requests; the worker stops once the queue is empty
        self._flushing = False  # stop holding batches for max_delay (set when draining)
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    @property
    def in_batches(self) -> int:
        """Requests in batches being run."""
        return self._in_batches

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.backend.metadata.name}")

    async def submit(self, image: np.ndarray, outputs: Sequence[str], deadline: float | None = None) -> BatchResult:
        """Queue one image (as the graph takes it) for the ``outputs`` it needs; returns when its batch
        has run (or raises a `GatewayError`)."""
        if self._closing:
            raise ShuttingDown("the model is being unloaded; retry, the next request goes to its successor")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(
                f"model {self.backend.metadata.name!r} has {len(self._queue)} requests queued (the limit, "
                f"--max-queue); the server is at capacity: retry with backoff or add replicas"
            )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        now = time.perf_counter()
        item = _Item(image, tuple(outputs), future, now, deadline)
        if not self._queue and not self._slots.locked() and self.max_delay_s <= 0:
            return await self._run_now(item)
        self._queue.append(item)
        self._wakeup.set()
        if deadline is None:
            return await future
        # a timer rather than asyncio.wait_for, which wraps every call in a task: this is the hot path
        timer = loop.call_later(max(0.0, deadline - now), _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def _run_now(self, item: _Item) -> BatchResult:
        """The idle fast path: nothing queued and a free slot, so this request is the whole batch;
        run it from the caller's task instead of waking the worker and creating a batch task (two
        event-loop round trips per request). Requests arriving meanwhile queue for the worker."""
        await self._slots.acquire()  # free (checked by the caller, nothing awaited since)
        try:
            await self._execute([item])
        finally:
            self._slots.release()
        return item.future.result()

    def flush(self) -> None:
        """From now on run queued requests at once, without holding batches to fill (the server is draining)."""
        self._flushing = True
        self._wakeup.set()

    async def close(self) -> None:
        """Run what is queued (without waiting for batches to fill), wait for running batches, stop."""
        self._closing = True
        self.flush()
        if self._worker is not None:
            await self._worker
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()
            if self.max_delay_s > 0 and not self._flushing:
                await self._wait_for_fill()
            items = self._take()
            if not items:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(items))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _wait_for_fill(self) -> None:
        """Hold the oldest request up to ``max_delay`` for the batch to fill (not while draining)."""
        until = self._queue[0].enqueued + self.max_delay_s
        while len(self._queue) < self.max_batch and not self._flushing:
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Item]:
        items, now = [], time.perf_counter()
        while self._queue and len(items) < self.max_batch:
            item = self._queue.popleft()
            if item.future.done():  # the caller gave up (cancelled or timed out)
                continue
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(_deadline_error())
                continue
            items.append(item)
        return items

    async def _execute(self, items: list[_Item]) -> None:
        wanted = set().union(*(i.outputs for i in items))
        names = [n for n in self._output_order if n in wanted]
        batch = items[0].image[None] if len(items) == 1 else np.stack([i.image for i in items])
        deadlines = [i.deadline for i in items]
        deadline = None if None in deadlines else max(deadlines)
        started = time.perf_counter()
        self._in_batches += len(items)
        try:
            results = await self.backend.infer(batch, names, deadline)
        except Exception as exc:  # the backend failed: every request in the batch gets the same error
            error = as_gateway_error(exc)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        finally:
            self._in_batches -= len(items)
        inference_s = time.perf_counter() - started
        if self._on_batch is not None:
            self._on_batch(len(items))
        for k, item in enumerate(items):
            if not item.future.done():
                item.future.set_result(BatchResult({n: results[n][k] for n in item.outputs},
                                                   started - item.enqueued, inference_s, len(items)))


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_deadline_error())


def _deadline_error() -> DeadlineExceeded:
    return DeadlineExceeded("the request's deadline passed before its batch had run; the server is loaded "
                            "or the deadline is shorter than a forward pass: allow more time, retry later, or "
                            "add replicas")
