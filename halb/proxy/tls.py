"""TLS termination for a listener: modern defaults, certificate reload on SIGHUP without dropping anyone.

How this works: `server_context(tls)` builds an `ssl.SSLContext` for a `TlsConfig`: TLS 1.2 minimum (or
1.3), forward-secret AEAD ciphers only for TLS 1.2 (Mozilla's "intermediate" list) unless `ciphers` says
otherwise, no compression, no renegotiation, the server's cipher order, ALPN `http/1.1` on HTTP
listeners. Each problem is a `TlsError` naming the config key ("cert", "key" or "ciphers") at fault, so the
config loader reports it like any other error. Backends get plain HTTP/TCP.

A connection holds its place in the listener's connection limits from the accept on, handshake included
(HAProxy counts a connection at accept too). So a TLS listener is not served by
`loop.create_server(ssl=...)`, whose proxy protocol starts only after the handshake and which says nothing
about failed ones: `halb.proxy.accept.Acceptor` accepts the connections itself, admits them, then runs
the handshake with `loop.connect_accepted_socket(ssl=...)`, the event loop's own TLS (uvloop's, in C),
with the listener's `header_timeout` as its timeout (a stalled client is dropped like a slowloris); a
handshake that fails or times out releases the slot at once and is counted in
`tls_handshake_failures_total` (`TlsTerminator.handshake_failures_total`).

Reload (`TlsTerminator.reload()`): the certificate and key files are read once into memory, checked
(PEM, and the key matches the certificate) and loaded into a scratch context; only when all that worked
are the very same bytes loaded into the listener's live context (through a private temporary file, since
OpenSSL loads from paths): new handshakes get the new certificate, established connections keep theirs,
so a SIGHUP never drops a connection, and a bad pair leaves the old one serving (counted and logged).

(`loop.start_tls()` on a plain connection would be the other way to get there, but uvloop 0.23 starts
reading a new connection right after `connection_made`, whatever it asked, so a ClientHello that arrives
with the accept goes to the plain protocol and the handshake hangs: uvloop issue #707.)
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile

from halb.config_model import TlsConfig

log = logging.getLogger("halb.proxy.tls")

# Mozilla "intermediate" TLS 1.2 suites: ECDHE key exchange, AEAD ciphers (TLS 1.3 suites are fixed).
MODERN_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


class TlsError(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _read(tls: TlsConfig) -> tuple[bytes, bytes]:
    try:
        with open(tls.cert, "rb") as f:
            cert = f.read()
    except OSError as exc:
        raise TlsError("cert", f"cannot read {tls.cert}: {exc.strerror or exc}") from None
    try:
        with open(tls.key, "rb") as f:
            key = f.read()
    except OSError as exc:
        raise TlsError("key", f"cannot read {tls.key}: {exc.strerror or exc}") from None
    return cert, key


def _check_pem(tls: TlsConfig, cert_pem: bytes, key_pem: bytes) -> None:
    """Precise errors for the usual mistakes, before OpenSSL's terse ones."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TlsError("cert", f"{tls.cert} is not a PEM certificate: {exc}") from None
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError("key", f"{tls.key} is not an unencrypted PEM private key: {exc}") from None
    if cert.public_key() != key.public_key():
        raise TlsError("key", f"{tls.key} does not match the certificate in {tls.cert}")


def _load_pair(ctx: ssl.SSLContext, tls: TlsConfig, cert_pem: bytes, key_pem: bytes) -> None:
    """load_cert_chain() from bytes: through a private temporary directory, removed at once."""
    with tempfile.TemporaryDirectory(prefix="halb-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError("cert", f"cannot use {tls.cert} with {tls.key}: {exc}") from None


def server_context(tls: TlsConfig, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A server-side SSLContext for `tls`; raises TlsError naming the key at fault."""
    cert_pem, key_pem = _read(tls)
    _check_pem(tls, cert_pem, key_pem)
    ctx = _base_context(tls, alpn)
    _load_pair(ctx, tls, cert_pem, key_pem)
    return ctx


def _base_context(tls: TlsConfig, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        ctx.set_ciphers(tls.ciphers or MODERN_CIPHERS)
    except ssl.SSLError as exc:
        raise TlsError("ciphers", f"no usable cipher in {tls.ciphers!r}: {exc}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class TlsTerminator:
    """The live context of one TLS listener, and its reload counters."""

    def __init__(self, config: TlsConfig, alpn: tuple[str, ...] = ()) -> None:
        self.config = config
        self.alpn = alpn
        self.context = server_context(config, alpn)
        self.reloads_total = 0
        self.reload_failures_total = 0
        self.handshake_failures_total = 0

    def reload(self) -> bool:
        """Re-read the certificate and key; True when the new pair is in use for new connections."""
        try:
            cert_pem, key_pem = _read(self.config)
            _check_pem(self.config, cert_pem, key_pem)
            _load_pair(_base_context(self.config, self.alpn), self.config, cert_pem, key_pem)  # rehearsal
            _load_pair(self.context, self.config, cert_pem, key_pem)
        except TlsError as exc:
            self.reload_failures_total += 1
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        self.reloads_total += 1
        return True
