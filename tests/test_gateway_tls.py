"""TLS and mutual TLS on the gateway's own ports (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``),
with certificates made here: both protocols answer over TLS; under mutual TLS a client without a
certificate, or with one from another CA, is refused; a client that does not trust the server's CA
refuses it; a renewed certificate is used for new connections without a restart."""

from __future__ import annotations

import shutil
import time

import pytest
from gateway_support import RunningGateway, image_bytes
from tls_support import make_certificates

from clients import Client, ClientError, RetryPolicy
from clients.transport import TLS

PNG = image_bytes((32, 48), seed=11)
ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    return {"main": make_certificates(folder), "other": make_certificates(folder, prefix="other-")}


def _addresses(gw: RunningGateway) -> dict[str, str]:
    return {"grpc": f"grpcs://127.0.0.1:{gw.server.grpc_port}", "http": f"https://127.0.0.1:{gw.server.http_port}"}


def _predicts(server: str, tls: TLS) -> bool:
    with Client(server, tls=tls, retry=ONCE, timeout=10) as client:
        return client.predict("scenes", PNG, tasks=["depth"]).model == "scenes"


def _refused(server: str, tls: TLS) -> ClientError:
    with pytest.raises(ClientError) as info, Client(server, tls=tls, retry=ONCE, timeout=10) as client:
        client.predict("scenes", PNG, tasks=["depth"])
    assert info.value.code == "UNAVAILABLE", info.value
    return info.value


def test_tls_serves_both_protocols_and_clients_check_the_server(exported_run, certs):
    main, other = certs["main"], certs["other"]
    with RunningGateway(run=exported_run, tls_cert=main["server.pem"], tls_key=main["server.key"]) as gw:
        for server in _addresses(gw).values():
            assert _predicts(server, TLS(ca=main["ca.pem"]))
            _refused(server, TLS(ca=other["ca.pem"]))  # the client does not trust the server's CA
        with pytest.raises(ClientError):  # plaintext against a TLS port
            with Client(f"http://127.0.0.1:{gw.server.http_port}", retry=ONCE, timeout=5) as client:
                client.list_models()


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_client_ca(exported_run, certs):
    main, other = certs["main"], certs["other"]
    with RunningGateway(run=exported_run, tls_cert=main["server.pem"], tls_key=main["server.key"],
                        tls_client_ca=main["ca.pem"]) as gw:
        for server in _addresses(gw).values():
            assert _predicts(server, TLS(ca=main["ca.pem"], cert=main["client.pem"], key=main["client.key"]))
            _refused(server, TLS(ca=main["ca.pem"]))  # no client certificate
            _refused(server, TLS(ca=main["ca.pem"], cert=other["client.pem"], key=other["client.key"]))  # wrong CA


def test_a_renewed_certificate_is_used_without_a_restart(exported_run, certs, tmp_path):
    main, other = certs["main"], certs["other"]
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(main["server.pem"], cert)
    shutil.copy(main["server.key"], key)
    with RunningGateway(run=exported_run, tls_cert=cert, tls_key=key, tls_reload_s=0.1) as gw:
        addresses = _addresses(gw)
        for server in addresses.values():
            assert _predicts(server, TLS(ca=main["ca.pem"]))
        shutil.copy(other["server.key"], key)  # the renewal: a certificate from the other CA
        shutil.copy(other["server.pem"], cert)
        time.sleep(0.5)
        for server in addresses.values():
            deadline = time.time() + 10
            while True:
                try:
                    assert _predicts(server, TLS(ca=other["ca.pem"]))
                    break
                except ClientError:
                    assert time.time() < deadline, f"{server} never used the renewed certificate"
                    time.sleep(0.2)
            _refused(server, TLS(ca=main["ca.pem"]))  # new connections no longer get the old certificate
