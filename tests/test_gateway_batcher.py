"""Dynamic batching (`serving.server.batcher`) on a scripted backend, and the ONNX Runtime backend."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnxruntime as ort
import pytest
from test_gateway_codec import metadata

from serving.server.backend import Backend, OnnxRuntimeBackend, create_backend
from serving.server.batcher import DynamicBatcher
from serving.server.errors import DeadlineExceeded, GatewayError, ModelLoadError, QueueFull, ShuttingDown
from serving.server.metadata import ModelMetadata
from training.export.manifest import load_manifest

META = metadata()


class ScriptedBackend(Backend):
    """Returns each image's mean as every output; records batch sizes; optional delay/failure."""

    kind = "scripted"

    def __init__(self, delay: float = 0.0, fail: bool = False, max_batch_size: int = 64) -> None:
        super().__init__(META, max_batch_size=max_batch_size)
        self.delay, self.fail = delay, fail
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
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        means = batch.reshape(len(batch), -1).mean(axis=1)
        return {name: means.copy() for name in outputs}


def image(value: float) -> np.ndarray:
    return np.full(META.input_shape, value, np.float32)


def run(coro):
    return asyncio.run(coro)


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
    assert first.batch_size == 1 and first.queue_s < 0.05


def test_requests_arriving_during_a_batch_form_the_next_one_with_the_union_of_outputs():
    backend = ScriptedBackend(delay=0.05)

    async def body(b):
        first = asyncio.ensure_future(b.submit(image(1), ["seg"]))
        await asyncio.sleep(0.01)  # the first batch is running now
        rest = [asyncio.ensure_future(b.submit(image(i / 10), ["depth"] if i % 2 else ["normal"])) for i in range(5)]
        return await first, await asyncio.gather(*rest)

    first, rest = run(_with_batcher(backend, body))
    assert backend.batches == [(1, ("seg",)), (5, ("depth", "normal"))]  # model output order
    assert [r.batch_size for r in rest] == [5] * 5
    assert [float(next(iter(r.outputs.values()))) for r in rest] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert all(r.queue_s > 0.02 for r in rest)


def test_max_batch_is_respected():
    backend = ScriptedBackend(delay=0.02)

    async def body(b):
        await asyncio.gather(*(b.submit(image(0), ["seg"]) for _ in range(7)))

    run(_with_batcher(backend, body, max_batch=3))
    assert [n for n, _ in backend.batches] == [1, 3, 3]  # the first finds the batcher idle and runs alone


def test_a_caller_that_gives_up_during_its_idle_run_frees_the_batcher():
    backend = ScriptedBackend(delay=0.05)

    async def body(b):
        first = asyncio.ensure_future(b.submit(image(0), ["seg"]))  # idle: runs at once, in its caller's task
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await asyncio.wait_for(b.submit(image(0.5), ["depth"]), 2)

    result = run(_with_batcher(backend, body))
    assert result.outputs == {"depth": pytest.approx(0.5)} and len(backend.batches) == 2


def test_backend_max_batch_size_caps_the_batcher():
    assert DynamicBatcher(ScriptedBackend(max_batch_size=4), max_batch=16).max_batch == 4


def test_max_delay_holds_the_first_request_for_the_batch_to_fill():
    backend = ScriptedBackend()

    async def body(b):
        start = time.perf_counter()
        first = asyncio.ensure_future(b.submit(image(0), ["seg"]))
        await asyncio.sleep(0.03)
        second = await b.submit(image(0), ["seg"])
        return await first, second, time.perf_counter() - start

    first, second, elapsed = run(_with_batcher(backend, body, max_delay_s=0.2, max_batch=4))
    assert backend.batches == [(2, ("seg",))] and first.batch_size == 2
    assert 0.15 < elapsed < 1.0 and first.queue_s >= 0.15


def test_a_full_batch_does_not_wait_for_the_delay():
    backend = ScriptedBackend()

    async def body(b):
        start = time.perf_counter()
        await asyncio.gather(*(b.submit(image(0), ["seg"]) for _ in range(4)))
        return time.perf_counter() - start

    assert run(_with_batcher(backend, body, max_delay_s=5.0, max_batch=4)) < 1.0


def test_full_queue_is_refused_at_once():
    backend = ScriptedBackend(delay=0.2)

    async def body(b):
        running = asyncio.ensure_future(b.submit(image(0), ["seg"]))
        await asyncio.sleep(0.02)  # running; the next two wait in the queue
        queued = [asyncio.ensure_future(b.submit(image(0), ["seg"])) for _ in range(2)]
        await asyncio.sleep(0)
        start = time.perf_counter()
        with pytest.raises(QueueFull, match="2 requests queued"):
            await b.submit(image(0), ["seg"])
        refused_after = time.perf_counter() - start
        await asyncio.gather(running, *queued)
        return refused_after

    assert run(_with_batcher(backend, body, max_queue=2, max_batch=1)) < 0.01


def test_deadline_passing_in_the_queue_skips_the_request_and_serving_goes_on():
    backend = ScriptedBackend(delay=0.2)

    async def body(b):
        running = asyncio.ensure_future(b.submit(image(0), ["seg"]))
        await asyncio.sleep(0.02)
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await b.submit(image(0), ["depth"], deadline=time.perf_counter() + 0.05)
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
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        await b.close()
        results = await asyncio.gather(*pending)
        with pytest.raises(ShuttingDown):
            await b.submit(image(0), ["seg"])
        return results, time.perf_counter() - start

    results, elapsed = run(body())
    assert len(results) == 3 and elapsed < 1.0


# --- ONNX Runtime backend -------------------------------------------------------------------------


def _ort_backend(run_dir, **kw) -> OnnxRuntimeBackend:
    meta = ModelMetadata.from_manifest("scenes", 1, load_manifest(run_dir))
    return create_backend("onnxruntime", run_dir, meta, **kw)


def test_onnxruntime_backend_matches_a_plain_session(exported_run):
    backend = _ort_backend(exported_run, max_batch_size=4, threads=1, warmup_batch_sizes=(1, 4))
    x = np.random.default_rng(0).random((3, *backend.metadata.input_shape), dtype=np.float32)

    async def body():
        await backend.load()
        try:
            return await backend.infer(x, ["depth", "segmentation"])
        finally:
            await backend.close()

    got = run(body())
    assert set(got) == {"depth", "segmentation"} and backend.kind == "onnxruntime"
    session = ort.InferenceSession(str(exported_run / "model.onnx"), providers=["CPUExecutionProvider"])
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
