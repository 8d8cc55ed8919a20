"""Dynamic batching (`serving.server.batcher`) on a scripted backend, and the ONNX Runtime backend.

The scripted backend holds every batch at a gate the test opens, and says when a batch started, so
the tests order events by waiting on them, never by sleeping and hoping the batcher got there."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnxruntime as ort
import pytest
from test_gateway_codec import metadata

from parsimony.manifest import load_manifest
from serving.server.backend import Backend, OnnxRuntimeBackend, create_backend
from serving.server.batcher import DynamicBatcher
from serving.server.errors import DeadlineExceeded, GatewayError, ModelLoadError, QueueFull, ShuttingDown
from serving.server.metadata import ModelMetadata

META = metadata()


class ScriptedBackend(Backend):
    """Returns each image's mean as every output; records batch sizes; optional failure. With
    ``gated`` every batch waits for ``gate`` to open; ``started`` is set when a batch begins."""

    kind = "scripted"

    def __init__(self, gated: bool = False, fail: bool = False, max_batch_size: int = 64) -> None:
        super().__init__(META, max_batch_size=max_batch_size)
        self.fail = fail
        self.gate, self.started = asyncio.Event(), asyncio.Event()
        if not gated:
            self.gate.set()
        self.batches: list[tuple[int, tuple[str, ...]]] = []
        self.deadlines: list[float | None] = []

    async def load(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    async def infer(self, batch, outputs, deadline=None):
        self.batches.append((len(batch), tuple(outputs)))
        self.deadlines.append(deadline)
        self.started.set()
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("boom")
        means = batch.reshape(len(batch), -1).mean(axis=1)
        return {name: means.copy() for name in outputs}


def image(value: float) -> np.ndarray:
    return np.full(META.input_shape, value, np.float32)


def run(coro):
    return asyncio.run(coro)


async def until(condition, turns: int = 1000) -> None:
    """Let the event loop run until ``condition()`` holds (a bounded number of turns, no clock)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the batcher never reached the expected state")


async def _with_batcher(backend, body, **kw):
    batcher = DynamicBatcher(backend, max_batch=kw.pop("max_batch", 8), **kw)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()


def test_idle_requests_run_at_once_alone_and_each_gets_its_own_slice():
    backend = ScriptedBackend()

    async def body(b):
        first = await b.submit(image(0.25), ["seg"])
        second = await b.submit(image(0.75), ["depth"])
        return first, second

    first, second = run(_with_batcher(backend, body, max_delay_s=0.0))
    assert backend.batches == [(1, ("seg",)), (1, ("depth",))]
    assert first.outputs == {"seg": pytest.approx(0.25)} and second.outputs == {"depth": pytest.approx(0.75)}
    assert first.batch_size == 1 and second.batch_size == 1


def test_requests_arriving_during_a_batch_form_the_next_one_with_the_union_of_outputs():
    backend = ScriptedBackend(gated=True)

    async def body(b):
        first = asyncio.ensure_future(b.submit(image(1), ["seg"]))
        await backend.started.wait()  # the first batch is running now
        rest = [asyncio.ensure_future(b.submit(image(i / 10), ["depth"] if i % 2 else ["normal"])) for i in range(5)]
        await until(lambda: b.depth == 5)
        backend.gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = run(_with_batcher(backend, body))
    assert backend.batches == [(1, ("seg",)), (5, ("depth", "normal"))]  # model output order
    assert [r.batch_size for r in rest] == [5] * 5
    assert [float(next(iter(r.outputs.values()))) for r in rest] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert all(r.queue_s > 0 for r in rest)


def test_max_batch_is_respected():
    backend = ScriptedBackend(gated=True)

    async def body(b):
        calls = [asyncio.ensure_future(b.submit(image(0), ["seg"])) for _ in range(7)]
        await backend.started.wait()
        await until(lambda: b.depth == 6)
        backend.gate.set()
        await asyncio.gather(*calls)

    run(_with_batcher(backend, body, max_batch=3))
    assert [n for n, _ in backend.batches] == [1, 3, 3]  # the first finds the batcher idle and runs alone


def test_a_caller_that_gives_up_during_its_idle_run_frees_the_batcher():
    backend = ScriptedBackend(gated=True)

    async def body(b):
        first = asyncio.ensure_future(b.submit(image(0), ["seg"]))  # idle: runs at once, in its caller's task
        await backend.started.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        backend.gate.set()
        return await asyncio.wait_for(b.submit(image(0.5), ["depth"]), 10)

    result = run(_with_batcher(backend, body))
    assert result.outputs == {"depth": pytest.approx(0.5)} and len(backend.batches) == 2


def test_backend_max_batch_size_caps_the_batcher():
    assert DynamicBatcher(ScriptedBackend(max_batch_size=4), max_batch=16).max_batch == 4


def test_max_delay_holds_the_first_request_for_the_batch_to_fill():
    backend = ScriptedBackend()

    async def body(b):
        first = asyncio.ensure_future(b.submit(image(0), ["seg"]))
        await until(lambda: b.depth == 1)  # held, not run alone
        second = await b.submit(image(0), ["seg"])  # fills the batch of 2: both run, without the 30 s
        return await first, second

    first, second = run(_with_batcher(backend, body, max_delay_s=30.0, max_batch=2))
    assert backend.batches == [(2, ("seg",))] and first.batch_size == second.batch_size == 2


def test_max_delay_runs_a_batch_that_did_not_fill_when_it_expires():
    backend = ScriptedBackend()

    async def body(b):
        return await b.submit(image(0), ["seg"])

    alone = run(_with_batcher(backend, body, max_delay_s=0.05, max_batch=4))
    assert backend.batches == [(1, ("seg",))] and alone.queue_s >= 0.05  # a timer never fires early


def test_a_full_batch_does_not_wait_for_the_delay():
    backend = ScriptedBackend()

    async def body(b):
        start = time.perf_counter()
        await asyncio.gather(*(b.submit(image(0), ["seg"]) for _ in range(4)))
        return time.perf_counter() - start

    assert run(_with_batcher(backend, body, max_delay_s=30.0, max_batch=4)) < 10.0


def test_full_queue_is_refused_at_once():
    backend = ScriptedBackend(gated=True)

    async def body(b):
        running = asyncio.ensure_future(b.submit(image(0), ["seg"]))
        await backend.started.wait()  # running; the next two wait in the queue
        queued = [asyncio.ensure_future(b.submit(image(0), ["seg"])) for _ in range(2)]
        await until(lambda: b.depth == 2)
        # refused while the running batch still holds the gate: the call did not wait for room
        with pytest.raises(QueueFull, match="2 requests queued"):
            await asyncio.wait_for(b.submit(image(0), ["seg"]), 10)
        assert not backend.gate.is_set()
        backend.gate.set()
        return await asyncio.gather(running, *queued)

    assert len(run(_with_batcher(backend, body, max_queue=2, max_batch=1))) == 3


def test_deadline_passing_in_the_queue_skips_the_request_and_serving_goes_on():
    backend = ScriptedBackend(gated=True)

    async def body(b):
        running = asyncio.ensure_future(b.submit(image(0), ["seg"]))
        await backend.started.wait()  # the gate holds it until the queued request's deadline passed
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await b.submit(image(0), ["depth"], deadline=time.perf_counter() + 0.05)
        backend.gate.set()
        await running
        return await b.submit(image(0.5), ["normal"])

    after = run(_with_batcher(backend, body, max_batch=1))
    assert after.outputs["normal"] == pytest.approx(0.5)
    assert [outs for _, outs in backend.batches] == [("seg",), ("normal",)]  # the expired one never ran


def test_a_batch_carries_the_latest_deadline_of_its_requests_to_the_backend():
    backend = ScriptedBackend()

    async def body(b):
        now = time.perf_counter()
        await asyncio.gather(b.submit(image(0), ["seg"], deadline=now + 5), b.submit(image(0), ["seg"], deadline=now + 9))
        await asyncio.gather(b.submit(image(0), ["seg"], deadline=now + 5), b.submit(image(0), ["seg"]))
        return now

    now = run(_with_batcher(backend, body, max_delay_s=5.0, max_batch=2))
    assert [n for n, _ in backend.batches] == [2, 2]
    assert backend.deadlines == [pytest.approx(now + 9), None]  # one request without a deadline: none


def test_backend_failure_reaches_every_request_of_the_batch_as_internal():
    backend = ScriptedBackend(fail=True)

    async def body(b):
        return await asyncio.gather(*(b.submit(image(0), ["seg"]) for _ in range(3)), return_exceptions=True)

    results = run(_with_batcher(backend, body))
    assert all(isinstance(r, GatewayError) and r.code.name == "INTERNAL" and "boom" in str(r) for r in results)


def test_close_runs_what_is_queued_without_waiting_and_then_refuses():
    backend = ScriptedBackend()

    async def body():
        b = DynamicBatcher(backend, max_batch=8, max_delay_s=30.0)
        b.start()
        pending = [asyncio.ensure_future(b.submit(image(0), ["seg"])) for _ in range(3)]
        await until(lambda: b.depth == 3)
        start = time.perf_counter()
        await b.close()
        results = await asyncio.gather(*pending)
        with pytest.raises(ShuttingDown):
            await b.submit(image(0), ["seg"])
        return results, time.perf_counter() - start

    results, elapsed = run(body())
    assert len(results) == 3 and elapsed < 10.0  # not the 30 s delay


# --- ONNX Runtime backend -------------------------------------------------------------------------


def _ort_backend(run_dir, **kw) -> OnnxRuntimeBackend:
    meta = ModelMetadata.from_manifest("scenes", 1, load_manifest(run_dir))
    return create_backend("onnxruntime", run_dir, meta, **kw)


def test_onnxruntime_backend_matches_a_plain_session(exported_raw_run):
    backend = _ort_backend(exported_raw_run, max_batch_size=4, threads=1, warmup_batch_sizes=(1, 4))
    x = np.random.default_rng(0).random((3, *backend.metadata.input_shape), dtype=np.float32)

    async def body():
        await backend.load()
        try:
            return await backend.infer(x, ["depth", "segmentation"])
        finally:
            await backend.close()

    got = run(body())
    assert set(got) == {"depth", "segmentation"} and backend.kind == "onnxruntime"
    session = ort.InferenceSession(str(exported_raw_run / "model.onnx"), providers=["CPUExecutionProvider"])
    want = dict(zip(["depth", "segmentation"], session.run(["depth", "segmentation"], {"image": x}), strict=True))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("mode", "allow", "stop"), [("run", "1", "1"), ("always", "1", "0"), ("never", "0", "0")])
def test_onnxruntime_backend_spinning_modes_set_the_session(exported_run, mode, allow, stop):
    backend = _ort_backend(exported_run, threads=1, spinning=mode)
    run(backend.load())
    options = backend._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
    assert options.get_session_config_entry("session.force_spinning_stop") == stop
    run(backend.close())


def test_onnxruntime_backend_refuses_an_unknown_spinning_mode(exported_run):
    with pytest.raises(ValueError, match=r"spinning must be one of \['run', 'always', 'never'\]"):
        _ort_backend(exported_run, spinning="sometimes")


def test_onnxruntime_backend_refuses_a_version_without_onnx(exported_run, tmp_path):
    (tmp_path / "manifest.json").write_bytes((exported_run / "manifest.json").read_bytes())
    with pytest.raises(ModelLoadError, match="embedded backend runs ONNX models"):
        run(_ort_backend(tmp_path).load())


def test_unknown_backend_lists_the_choices(exported_run):
    meta = ModelMetadata.from_manifest("scenes", 1, load_manifest(exported_run))
    with pytest.raises(ValueError, match="choose one of .*onnxruntime"):
        create_backend("tensorflow", exported_run, meta)
