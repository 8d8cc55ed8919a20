"""TLS and mutual TLS for both front ends, from PEM files, with certificates renewed without a restart.

``--tls-cert``/``--tls-key`` turn TLS on for gRPC and HTTP; ``--tls-client-ca`` also requires every
client to present a certificate signed by one of its CAs (mutual TLS). Renewal (cert-manager or any
tool that replaces the files): the files are checked at most every ``--tls-reload-s`` seconds and,
when they changed, new connections get the new certificate; connections already open keep theirs.

- gRPC: dynamic server credentials; grpc asks `CertificateFiles.grpc_update` before each handshake.
- HTTP: the server's `ssl.SSLContext` loads the new chain in place (`CertificateFiles.reload_context`),
  which OpenSSL uses for the handshakes that follow. A changed client CA bundle is only *added* to
  the HTTP context (OpenSSL cannot forget a CA): removing a CA from the HTTP side takes a restart.

A renewal that cannot be read (a half-written file, a key that does not match) is logged and the
current certificate stays in use.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path

import grpc

from serving.server.config import default
from serving.server.errors import StartupError

log = logging.getLogger("serving.server")


class CertificateFiles:
    """The server's certificate, key and optional client CA, and when they last changed."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None,
                 reload_s: float = default("tls_reload_s")) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), None if client_ca is None else Path(client_ca)
        self.reload_s = reload_s
        self._lock = threading.Lock()  # grpc calls grpc_update from its own threads
        self._checked = time.monotonic()
        self._stamp = self._stamps()
        self._grpc_stamp = self._stamp
        self._http_stamp = self._stamp

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _paths(self) -> list[Path]:
        return [p for p in (self.cert, self.key, self.client_ca) if p is not None]

    def _stamps(self) -> tuple:
        try:
            return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in self._paths())
        except OSError:
            return ()

    def _current(self) -> tuple:
        """The files' stamp, re-read at most every ``reload_s`` seconds."""
        with self._lock:
            now = time.monotonic()
            if self.reload_s > 0 and now - self._checked >= self.reload_s:
                self._checked = now
                stamp = self._stamps()
                if stamp:  # a file missing for a moment (being replaced): keep the last stamp
                    self._stamp = stamp
            return self._stamp

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        return (self.cert.read_bytes(), self.key.read_bytes(),
                None if self.client_ca is None else self.client_ca.read_bytes())

    # --- gRPC ---

    def grpc_credentials(self) -> grpc.ServerCredentials:
        try:
            initial = self._grpc_configuration()
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot read the TLS files ({exc}); check --tls-cert, --tls-key and "
                               f"--tls-client-ca") from exc
        return grpc.dynamic_ssl_server_credentials(initial, self.grpc_update,
                                                   require_client_authentication=self.mutual)

    def _grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self._read()
        if b"PRIVATE KEY" not in key or b"CERTIFICATE" not in cert:
            raise ValueError(f"{self.key} or {self.cert} is not PEM")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def grpc_update(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each handshake: a new configuration when the files changed, else None."""
        stamp = self._current()
        if stamp == self._grpc_stamp:
            return None
        try:
            ssl_context(self)  # validates the pair (grpc would fail every handshake on a bad one)
            configuration = self._grpc_configuration()
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("TLS: the renewed certificate files cannot be used, gRPC keeps the current ones: %s", exc)
            self._grpc_stamp = stamp
            return None
        self._grpc_stamp = stamp
        log.info("TLS: gRPC uses the renewed certificate from %s", self.cert)
        return configuration

    # --- HTTP ---

    def reload_context(self, context: ssl.SSLContext) -> bool:
        """Load changed files into ``context`` (the HTTP server's); True when it did."""
        stamp = self._current()
        if stamp == self._http_stamp:
            return False
        self._http_stamp = stamp
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
            if self.client_ca is not None:
                context.load_verify_locations(cafile=str(self.client_ca))
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS: the renewed certificate files cannot be used, HTTP keeps the current ones: %s", exc)
            return False
        log.info("TLS: HTTP uses the renewed certificate from %s", self.cert)
        return True


def ssl_context(files: CertificateFiles) -> ssl.SSLContext:
    """The HTTP server's context: TLS 1.2 or later, client certificates required under mutual TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert), str(files.key))
    if files.client_ca is not None:
        context.load_verify_locations(cafile=str(files.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def http_ssl_context(files: CertificateFiles) -> ssl.SSLContext:
    try:
        return ssl_context(files)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot use the TLS files for HTTP ({exc}); check that --tls-key is the key of "
                           f"--tls-cert and that all are PEM") from exc
