"""Malformed requests over both protocols (the fast tier of `benchmarks.soak`'s fuzzing): every one is
answered with a client error and a message, none with INTERNAL/UNKNOWN or a traceback in the log,
and the gateway serves correctly afterwards."""

from __future__ import annotations

import pytest
from gateway_support import RunningGateway, image_bytes

from benchmarks import soak_fuzz
from clients import Client

PNG = image_bytes((32, 48), seed=2)


@pytest.fixture(scope="module")
def gw(exported_run):
    with RunningGateway(run=exported_run, models=("scenes",), max_header_bytes=64 << 10) as gw:
        yield gw


@pytest.mark.parametrize("seed", [0, 1])
def test_a_few_hundred_malformed_requests_all_get_a_client_error_with_a_message(gw, seed, caplog):
    with caplog.at_level("WARNING"):
        report = soak_fuzz.fuzz(gw.grpc_target, gw.http_url, "scenes", 300, seed=seed)
    assert report["sent"] == 300 and report["internal"] == 0, report["by_code"]
    assert report["client_errors"] == report["sent"], (report["by_code"], report["examples"])
    assert not [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]
    for server in (gw.grpc_target, gw.http_url):
        with Client(server) as client:
            assert client.predict("scenes", PNG, tasks=["depth"]).model == "scenes"
