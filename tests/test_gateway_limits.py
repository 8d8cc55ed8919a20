"""The gateway's limits against clients that misbehave: oversized heads, slow or silent connections,
too many connections, unbounded deadlines; and the command line that sets them (defaults from one place)."""

from __future__ import annotations

import socket
import time

import grpc
import httpx
import pytest
from gateway_support import RunningGateway, image_bytes

from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.server.__main__ import build_parser, config_from_args
from serving.server.__main__ import main as server_main
from serving.server.config import ServerConfig, default

PNG = image_bytes((32, 48), seed=3)


@pytest.fixture(scope="module")
def gw(exported_run):
    with RunningGateway(run=exported_run, header_timeout_s=0.5, idle_timeout_s=0.5, max_connections=8,
                        max_header_bytes=32 << 10, max_deadline_s=7) as gw:
        yield gw


def _connect(gw: RunningGateway, port: int | None = None) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port or gw.server.http_port), timeout=5)


def _read_until_closed(sock: socket.socket, limit_s: float = 5) -> tuple[bytes, float]:
    started, data = time.perf_counter(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data, time.perf_counter() - started


@pytest.mark.parametrize("size", [100 << 10, 1 << 20])
def test_an_oversized_request_head_gets_431_with_a_message(gw, size):
    with gw.http() as client:
        assert client.get("/healthz").status_code == 200  # the next head arrives on a kept-alive connection
        r = client.get("/healthz", headers={"X-Padding": "a" * size})
        assert r.status_code == 431, r.text
        assert "--max-header-bytes" in r.json()["error"]["message"]
        assert client.get("/healthz", headers={"X-Padding": "a" * (16 << 10)}).status_code == 200


def test_malformed_http_gets_400_with_a_message(gw):
    with _connect(gw) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data, _ = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 400 ") and b"not valid HTTP/1.1" in data


def test_a_slow_request_head_gets_408_and_is_closed(gw):
    with _connect(gw) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        data, waited = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and b"--header-timeout-s" in data and waited < 4


def test_silent_and_idle_connections_are_closed(gw):
    with _connect(gw) as silent:
        data, waited = _read_until_closed(silent)
        assert data == b"" and waited < 4
    with _connect(gw) as idle:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data, waited = _read_until_closed(idle)
        assert data.startswith(b"HTTP/1.1 200 ") and waited < 4  # answered, then closed when idle
    with _connect(gw, gw.server.grpc_port) as silent_grpc:  # no HTTP/2 preface: the handshake times out
        data, waited = _read_until_closed(silent_grpc)
        assert waited < 4


def test_connections_over_the_limit_get_503(gw):
    held = [_connect(gw) for _ in range(8)]
    try:
        time.sleep(0.1)
        with _connect(gw) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data, _ = _read_until_closed(extra)
        assert data.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in data
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with gw.http() as client:
        assert client.get("/healthz").status_code == 200


def test_deadlines_are_capped_and_the_response_says_so(gw):
    with gw.http() as client:
        headers = {"Content-Type": "image/png"}
        for extra in ({}, {"X-Timeout-Ms": "1e9"}):
            r = client.post("/v1/models/scenes:predict", content=PNG, headers={**headers, **extra})
            assert r.status_code == 200 and r.headers["x-deadline-capped-ms"] == "7000"
        r = client.post("/v1/models/scenes:predict", content=PNG, headers={**headers, "X-Timeout-Ms": "5000"})
        assert r.status_code == 200 and "x-deadline-capped-ms" not in r.headers
    with grpc.insecure_channel(gw.grpc_target) as channel:
        predict = channel.unary_unary("/parsimony.v1.PredictionService/Predict",
                                      request_serializer=pb.PredictRequest.SerializeToString,
                                      response_deserializer=pb.PredictResponse.FromString)
        _, call = predict.with_call(pb.PredictRequest(model="scenes", encoded_image=PNG))
        assert dict(call.trailing_metadata())["x-deadline-capped-ms"] == "7000"


def test_responses_name_no_server_software(gw):
    with gw.http() as client:
        assert "server" not in client.get("/healthz").headers


# --- the command line ---------------------------------------------------------------------------


def test_help_shows_the_examples_intact_and_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--model scenes \\\n        --backend triton" in text  # a line continuation, not a joined line
    for flag in ("--max-queue", "--max-batch", "--max-deadline-s", "--max-header-bytes", "--max-connections"):
        value = default(flag[2:].replace("-", "_"))
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        entry = text.split("\noptions:\n", 1)[1].split(f"\n  {flag} ", 1)[1].split("\n  --", 1)[0]
        assert f"(default {shown})" in " ".join(entry.split()), flag


def test_the_batcher_and_backends_take_their_defaults_from_the_config():
    import inspect

    from serving.server.backend import OnnxRuntimeBackend
    from serving.server.batcher import DynamicBatcher
    from serving.server.models import BatchingOptions

    assert BatchingOptions().max_queue == default("max_queue") == ServerConfig.model_fields["max_queue"].default
    assert BatchingOptions().max_batch == default("max_batch")
    assert inspect.signature(DynamicBatcher).parameters["max_queue"].default == default("max_queue")
    assert inspect.signature(OnnxRuntimeBackend).parameters["max_batch_size"].default == default("max_batch")


def test_every_flag_shows_its_default_from_the_config():
    """Every flag of a setting with a default says that default, as `ServerConfig` holds it."""
    parser = build_parser()
    checked = []
    for action in parser._actions:
        field = ServerConfig.model_fields.get(action.dest)
        if field is None or field.default in (None, ()) or not action.option_strings:
            continue
        value = field.default
        shown = ("on" if value else "off") if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) \
            else str(value)
        assert f"default {shown}" in " ".join(action.help.split()), action.option_strings
        checked.append(action.dest)
    assert {"max_queue", "max_batch", "backend", "threads", "ort_spinning", "docs", "tls_reload_s"} <= set(checked)


def test_backends_and_the_certificate_watcher_take_their_defaults_from_the_config():
    import inspect

    from serving.server.backend import OnnxRuntimeBackend
    from serving.server.batcher import DynamicBatcher
    from serving.server.models import ModelManager
    from serving.server.tls import CertificateFiles
    from serving.server.triton_backend import TritonBackend

    def defaults(target) -> dict:
        return {k: p.default for k, p in inspect.signature(target).parameters.items()}

    assert defaults(DynamicBatcher)["max_delay_s"] == default("max_queue_delay_ms") / 1e3
    assert defaults(DynamicBatcher)["max_batch"] == default("max_batch")
    ort = defaults(OnnxRuntimeBackend)
    assert (ort["threads"], ort["spinning"], ort["warmup_batch_sizes"]) == (
        default("threads"), default("ort_spinning"), default("warmup_batch_sizes"))
    triton = defaults(TritonBackend)
    assert (triton["max_batch_size"], triton["concurrency"], triton["load_timeout_s"]) == (
        default("max_batch"), default("triton_concurrency"), default("triton_load_timeout_s"))
    assert ModelManager.__dataclass_fields__["backend"].default == default("backend")
    assert ModelManager.__dataclass_fields__["poll_interval_s"].default == default("poll_interval_s")
    assert defaults(CertificateFiles)["reload_s"] == default("tls_reload_s")


def test_flags_reach_the_config(exported_run):
    args = build_parser().parse_args(["--run", str(exported_run), "--max-deadline-s", "5", "--idle-timeout-s", "3",
                                      "--max-connections", "10", "--docs"])
    config = config_from_args(args)
    assert (config.max_deadline_s, config.idle_timeout_s, config.max_connections, config.docs) == (5, 3, 10, True)


def test_bugs_are_not_turned_into_one_line_exits(exported_run, monkeypatch):
    """Only the project's own startup errors become 'error: ...' and exit 2; a bug keeps its traceback."""
    from serving.server import lifecycle

    def broken(self):
        raise KeyError("a bug")

    monkeypatch.setattr(lifecycle.GatewayServer, "run", broken)
    with pytest.raises(KeyError):
        server_main(["--run", str(exported_run)])


def test_tls_flags_are_checked(exported_run, tmp_path, capsys):
    assert server_main(["--run", str(exported_run), "--tls-cert", str(tmp_path / "missing.pem")]) == 2
    assert "--tls-key" in capsys.readouterr().err
    (tmp_path / "a.pem").write_text("x")
    assert server_main(["--run", str(exported_run), "--tls-cert", str(tmp_path / "a.pem"),
                        "--tls-key", str(tmp_path / "b.pem")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_unreachable_http_port_and_connect_refused_is_unavailable():
    """(helper sanity) a refused connection is a transport error, which the client maps to UNAVAILABLE."""
    with pytest.raises(httpx.TransportError):
        httpx.get("http://127.0.0.1:9/healthz", timeout=1)
