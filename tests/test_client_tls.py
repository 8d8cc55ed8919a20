"""The client over TLS: mutual TLS round trips over gRPC and HTTPS against the gateway's own TLS
ports (``--tls-cert``/``--tls-key``/``--tls-client-ca``), with certificates made at test time. The
client must present its certificate and check the server's against the test CA; without either the
call fails."""

from __future__ import annotations

import numpy as np
import pytest
from gateway_support import RunningGateway, image_bytes
from tls_support import make_certificates

from clients import Client, ClientError, RetryPolicy
from clients.predict import main as predict_main
from clients.transport import TLS

PNG = image_bytes((32, 48), seed=9)
ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def tls(tmp_path_factory, exported_run):
    certs = make_certificates(tmp_path_factory.mktemp("certs"))
    with RunningGateway(run=exported_run, models=("scenes",), tls_cert=certs["server.pem"],
                        tls_key=certs["server.key"], tls_client_ca=certs["ca.pem"]) as gw:
        yield {"gw": gw, "certs": certs, "grpcs": f"grpcs://127.0.0.1:{gw.server.grpc_port}",
               "https": f"https://127.0.0.1:{gw.server.http_port}"}


def mutual(certs) -> TLS:
    return TLS(ca=certs["ca.pem"], cert=certs["client.pem"], key=certs["client.key"])


def test_mutual_tls_round_trips_over_grpc_and_https(tls):
    with Client(tls["grpcs"], tls=mutual(tls["certs"])) as first:
        want = first.predict("scenes", PNG)
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
