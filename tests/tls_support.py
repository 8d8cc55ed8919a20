"""Certificates made at test time with the ``cryptography`` package: a CA, a server certificate for
127.0.0.1/localhost and a client certificate, each signed by the CA (EC P-256, valid for two days)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _certificate(subject: str, issuer: x509.Name, public_key, signing_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def make_certificates(folder: Path, prefix: str = "") -> dict[str, Path]:
    """``ca.pem``, ``server.pem``/``server.key`` and ``client.pem``/``client.key`` in ``folder`` (names
    prefixed with ``prefix``); returns name -> path (without the prefix in the keys)."""
    folder = Path(folder)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"parsimony test CA {prefix}".strip())
    ca = _certificate(ca_name.rfc4514_string()[3:], ca_name, ca_key.public_key(), ca_key,
                      [(x509.BasicConstraints(ca=True, path_length=None), True)])
    paths = {"ca.pem": folder / f"{prefix}ca.pem"}
    paths["ca.pem"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    usages = {
        "server": [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                 x509.DNSName("localhost")]), False),
                   (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
        "client": [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    }
    for role, extensions in usages.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(role, ca_name, key.public_key(), ca_key,
                            [(x509.BasicConstraints(ca=False, path_length=None), True), *extensions])
        paths[f"{role}.pem"], paths[f"{role}.key"] = folder / f"{prefix}{role}.pem", folder / f"{prefix}{role}.key"
        paths[f"{role}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, paths[f"{role}.key"])
    return paths
