"""Deadlines and retries against real gateways: a slow backend past the deadline, a port with nothing
listening until a gateway comes up there, a model still loading, and the retry bookkeeping itself.

Ordering is made deterministic by events, not sleeps: the gateway is started (or its model let
load) from the retry policy's ``on_retry`` hook, i.e. strictly after the first attempt failed."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from gateway_support import RunningGateway, SlowBackend, free_port, image_bytes

from clients import AsyncClient, Client, ClientError, RetryPolicy
from clients.retry import Attempts
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.server.backend import OnnxRuntimeBackend, register_backend

SIZE = (32, 48)
PNG = image_bytes(SIZE, seed=5)
GATE = threading.Event()


@register_backend("gated-onnxruntime")
class GatedBackend(OnnxRuntimeBackend):
    """Loads only once the test opens `GATE`."""

    async def load(self) -> None:
        assert await asyncio.to_thread(GATE.wait, 60), "the test never opened the gate"
        await super().load()


def address(gw, protocol: str) -> str:
    return gw.grpc_target if protocol == "grpc" else gw.http_url


@pytest.fixture(scope="module")
def slow_gw(exported_run):
    with RunningGateway(run=exported_run, models=("scenes",), backend="slow-onnxruntime") as gw:
        yield gw


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_call_past_its_deadline_is_deadline_exceeded_and_not_retried(slow_gw, protocol, monkeypatch):
    monkeypatch.setattr(SlowBackend, "infer_delay", 3.0)
    retried = []
    with Client(address(slow_gw, protocol), retry=RetryPolicy(on_retry=lambda *e: retried.append(e))) as client:
        start = time.perf_counter()
        with pytest.raises(ClientError) as info:
            client.predict("scenes", PNG, timeout=0.3)
        assert time.perf_counter() - start < 3.0  # answered at the deadline, not after the forward pass
        assert info.value.code == "DEADLINE_EXCEEDED" and not retried
        assert info.value.http_status in (None, 504)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_deadline(slow_gw, protocol, monkeypatch):
    monkeypatch.setattr(SlowBackend, "infer_delay", 3.0)

    async def go():
        async with AsyncClient(address(slow_gw, protocol), timeout=0.3) as client:
            with pytest.raises(ClientError) as info:
                await client.predict("scenes", PNG)
            return info.value.code

    assert asyncio.run(go()) == "DEADLINE_EXCEEDED"


class LateGateway:
    """Starts a gateway on fixed ports from the first ``on_retry``: after the first attempt has failed."""

    def __init__(self, run_dir) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.run_dir, self.events, self.gw = run_dir, [], None

    def on_retry(self, attempt: int, error: ClientError, wait: float) -> None:
        self.events.append((attempt, error.code))
        if self.gw is None:
            self.gw = RunningGateway(run=self.run_dir, models=("scenes",), grpc_port=self.grpc_port,
                                     http_port=self.http_port).__enter__()

    def address(self, protocol: str) -> str:
        return f"127.0.0.1:{self.grpc_port}" if protocol == "grpc" else f"http://127.0.0.1:{self.http_port}"

    def close(self) -> None:
        if self.gw is not None:
            self.gw.__exit__(None, None, None)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unavailable_is_retried_until_a_gateway_comes_up(exported_run, protocol, mode):
    late = LateGateway(exported_run)
    policy = RetryPolicy(max_attempts=None, initial_backoff=0.02, max_backoff=0.2, on_retry=late.on_retry)
    try:
        if mode == "sync":
            with Client(late.address(protocol), retry=policy, timeout=60) as client:
                p = client.predict("scenes", PNG)
        else:
            async def go():
                async with AsyncClient(late.address(protocol), retry=policy, timeout=60) as client:
                    return await client.predict("scenes", PNG)

            p = asyncio.run(go())
    finally:
        late.close()
    assert p.model == "scenes" and p.outputs["depth"].shape == SIZE
    assert late.events[0] == (1, "UNAVAILABLE")  # nothing was listening at the first attempt
    assert {code for _, code in late.events} == {"UNAVAILABLE"}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_retries_stop_at_the_attempt_limit_and_at_the_deadline(protocol):
    port = free_port()  # nothing listens there
    server = f"127.0.0.1:{port}" if protocol == "grpc" else f"http://127.0.0.1:{port}"
    events = []
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, on_retry=lambda *e: events.append(e))
    with Client(server, retry=policy) as client, pytest.raises(ClientError) as info:
        client.get_model("scenes")
    assert (info.value.code, info.value.attempts, len(events)) == ("UNAVAILABLE", 3, 2)
    assert "gave up after 3 attempts" in str(info.value)

    unbounded = RetryPolicy(max_attempts=None, initial_backoff=0.05, max_backoff=0.1)
    with Client(server, retry=unbounded, timeout=0.5) as client, pytest.raises(ClientError) as info:
        start = time.perf_counter()
        client.list_models()
    assert info.value.code == "UNAVAILABLE" and info.value.attempts > 1
    assert time.perf_counter() - start < 0.5 + 1.0  # no retry starts past the deadline (generous slack)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_still_loading_is_unavailable_then_served(exported_run, protocol):
    GATE.clear()
    with RunningGateway(run=exported_run, models=("scenes",), backend="gated-onnxruntime", wait_ready=False) as gw:
        try:
            with Client(address(gw, protocol), retry=RetryPolicy(max_attempts=1)) as client:
                assert client.ready() is False
                with pytest.raises(ClientError) as info:
                    client.predict("scenes", PNG)
                assert info.value.code == "UNAVAILABLE" and "loading" in str(info.value)
                assert info.value.http_status == (503 if protocol == "http" else None)
                with pytest.raises(ClientError, match="not ready yet"):
                    client.wait_ready(timeout=0.3)

                opened = RetryPolicy(max_attempts=None, initial_backoff=0.02, max_backoff=0.2,
                                     on_retry=lambda *event: GATE.set())
                with Client(address(gw, protocol), retry=opened, timeout=60) as retrying:
                    assert retrying.predict("scenes", PNG).model == "scenes"
                assert client.wait_ready(timeout=30) is True and client.ready() is True
        finally:
            GATE.set()  # never leave the loader waiting


def test_backoff_grows_exponentially_with_bounded_jitter():
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2, max_backoff=0.5, jitter=0.5)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        waits = [policy.backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits) and max(waits) - min(waits) > ceiling / 10
    assert RetryPolicy(jitter=0).backoff(2) == 0.1
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_only_retry_codes_are_retried_and_never_past_the_deadline():
    attempts = Attempts(RetryPolicy(max_attempts=5, initial_backoff=0.01), timeout=None)
    attempts.remaining()
    with pytest.raises(ClientError) as info:
        attempts.wait_after(ClientError("RESOURCE_EXHAUSTED", "queue full"))
    assert info.value.attempts == 1
    attempts = Attempts(RetryPolicy(initial_backoff=10, jitter=0), timeout=1.0)
    assert 0 < attempts.remaining() <= 1.0
    with pytest.raises(ClientError, match="down"):  # a 10 s wait would end after the 1 s deadline
        attempts.wait_after(ClientError("UNAVAILABLE", "down"))


class _CancelFirst:
    """A bare gRPC server whose ListModels is cancelled by the server ``times`` times, then answers."""

    def __init__(self, times: int) -> None:
        self.calls = 0

        def list_models(request, context):
            self.calls += 1
            if self.calls <= times:
                context.abort(grpc.StatusCode.CANCELLED, "the server went away")
            return pb.ListModelsResponse()

        handler = grpc.method_handlers_generic_handler("parsimony.v1.PredictionService", {
            "ListModels": grpc.unary_unary_rpc_method_handler(
                list_models, request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString)})
        self.server = grpc.server(futures.ThreadPoolExecutor(2), handlers=(handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def __enter__(self) -> _CancelFirst:
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(0)


def test_a_cancelled_the_client_did_not_cause_is_retried_for_idempotent_calls():
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.02)
    with _CancelFirst(times=2) as server, Client(f"127.0.0.1:{server.port}", retry=policy) as client:
        assert client.list_models() == [] and server.calls == 3

    async def go(port: int) -> list:
        async with AsyncClient(f"127.0.0.1:{port}", retry=policy) as client:
            return await client.list_models()

    with _CancelFirst(times=2) as server:
        assert asyncio.run(go(server.port)) == [] and server.calls == 3


def test_a_cancelled_is_not_retried_when_the_client_closed_its_channel_or_for_other_codes():
    attempts = Attempts(RetryPolicy(), timeout=None, idempotent=True)
    attempts.remaining()
    local = ClientError("CANCELLED", "Channel closed!")
    local.local = True
    with pytest.raises(ClientError):
        attempts.wait_after(local)
    not_idempotent = Attempts(RetryPolicy(), timeout=None, idempotent=False)
    not_idempotent.remaining()
    with pytest.raises(ClientError):
        not_idempotent.wait_after(ClientError("CANCELLED", "cancelled by the server"))
    retried = Attempts(RetryPolicy(), timeout=None, idempotent=True)
    retried.remaining()
    assert retried.wait_after(ClientError("CANCELLED", "cancelled by the server")) >= 0
