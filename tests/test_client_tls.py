"""TLS round trips: mutual TLS over gRPC and HTTPS with certificates made here by the openssl CLI.

The gateway itself listens in plaintext (TLS terminates in front of it: an ingress or a sidecar), so
the TLS endpoints here are the gateway's own gRPC servicer (`grpc_service.build_server` on a secure
port) and its own FastAPI app (uvicorn with a certificate), both on the running gateway's event
loop and serving its models. The client must present its certificate and check the server's
against the test CA; without either the call fails."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess

import grpc
import numpy as np
import pytest
import uvicorn
from gateway_support import RunningGateway, image_bytes

from clients import Client, ClientError, RetryPolicy
from clients.predict import main as predict_main
from clients.transport import TLS
from serving.server import grpc_service

PNG = image_bytes((32, 48), seed=9)
ONCE = RetryPolicy(max_attempts=1)
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder) -> dict:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, signed by the CA."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=parsimony test CA",
             cwd=folder)
    for name, extensions in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                             ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{extensions}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


class _Uvicorn(uvicorn.Server):
    def capture_signals(self):
        return contextlib.nullcontext()


async def _start_tls_endpoints(gw: RunningGateway, certs: dict):
    read = {k: v.read_bytes() for k, v in certs.items()}
    grpc_server = grpc_service.build_server(gw.server.gateway, gw.server.health)
    credentials = grpc.ssl_server_credentials([(read["server.key"], read["server.pem"])],
                                              root_certificates=read["ca.pem"], require_client_auth=True)
    grpc_port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    await grpc_server.start()
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    https = _Uvicorn(uvicorn.Config(gw.server.app, log_level="warning", lifespan="off",
                                    ssl_certfile=str(certs["server.pem"]), ssl_keyfile=str(certs["server.key"]),
                                    ssl_ca_certs=str(certs["ca.pem"]), ssl_cert_reqs=ssl.CERT_REQUIRED))
    task = asyncio.get_running_loop().create_task(https.serve(sockets=[sock]))
    while not https.started:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    return grpc_server, grpc_port, https, task, sock.getsockname()[1]


async def _stop(grpc_server, https, task) -> None:
    https.should_exit = True
    await asyncio.gather(grpc_server.stop(1), task)


@pytest.fixture(scope="module")
def tls(tmp_path_factory, exported_run):
    certs = make_certificates(tmp_path_factory.mktemp("certs"))
    with RunningGateway(run=exported_run, models=("scenes",)) as gw:
        grpc_server, grpc_port, https, task, https_port = gw.call(_start_tls_endpoints(gw, certs))
        try:
            yield {"gw": gw, "certs": certs, "grpcs": f"grpcs://127.0.0.1:{grpc_port}",
                   "https": f"https://127.0.0.1:{https_port}"}
        finally:
            gw.call(_stop(grpc_server, https, task))


def mutual(certs) -> TLS:
    return TLS(ca=certs["ca.pem"], cert=certs["client.pem"], key=certs["client.key"])


def test_mutual_tls_round_trips_over_grpc_and_https(tls):
    with Client(tls["gw"].grpc_target) as plain:
        want = plain.predict("scenes", PNG)
    for server in (tls["grpcs"], tls["https"]):
        with Client(server, tls=mutual(tls["certs"])) as client:
            assert client.ready() and client.get_model("scenes").input_size == (32, 48)
            got = client.predict("scenes", PNG)
            np.testing.assert_array_equal(got.outputs["segmentation"], want.outputs["segmentation"])
            np.testing.assert_allclose(got.outputs["depth"], want.outputs["depth"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["grpcs", "https"])
def test_tls_fails_without_a_client_certificate_or_a_trusted_server(tls, scheme):
    certs = tls["certs"]
    with Client(tls[scheme], tls=TLS(ca=certs["ca.pem"]), retry=ONCE, timeout=10) as client, \
            pytest.raises(ClientError) as no_client_cert:
        client.get_model("scenes")
    with Client(tls[scheme], retry=ONCE, timeout=10) as client, pytest.raises(ClientError) as untrusted:
        client.get_model("scenes")  # the system's roots do not know the test CA
    assert no_client_cert.value.code == untrusted.value.code == "UNAVAILABLE"
    assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)


def test_predict_command_takes_certificate_options(tls, tmp_path, capsys):
    certs = tls["certs"]
    (tmp_path / "in.png").write_bytes(PNG)
    argv = [str(tmp_path / "in.png"), "--ca", str(certs["ca.pem"]), "--cert", str(certs["client.pem"]),
            "--key", str(certs["client.key"]), "--out", str(tmp_path / "out")]
    assert predict_main([*argv, "--server", tls["https"]]) == 0
    assert predict_main([*argv, "--server", tls["grpcs"].removeprefix("grpcs://")]) == 0  # --ca implies TLS
    assert (tmp_path / "out" / "in.depth.png").is_file()
    assert capsys.readouterr().out.count("in.png: scenes v1") == 2
