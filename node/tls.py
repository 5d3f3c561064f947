"""DICOM TLS (PS3.15 B.1): SSL contexts for the listening port and for outgoing associations.

The listening port's TLS handshake runs on the connection's own thread, under a time
limit (:func:`make_handshake_handler`): pynetdicom would otherwise perform it inside its
accept loop, where one client that connects and sends nothing stops every other
association from being accepted.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from pynetdicom import evt

from config.schema import TlsSection
from node.audit import AuditLog

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file."""


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose ``wrap_socket`` leaves the handshake to :func:`make_handshake_handler`."""

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect and not server_side,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def _load(what: str, path: Path, call: Callable[[], object]) -> None:
    try:
        call()
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"{path}: cannot load the {what}: {exc}") from exc


def server_context(tls: TlsSection) -> ssl.SSLContext | None:
    """The listening port's context (TLS 1.2 or later), or ``None`` when ``tls.enabled`` is false.

    Callers are verified against ``tls.ca_certificates``: a certificate that does not
    chain to it is refused, and with ``tls.require_client_certificate`` so is a caller
    without one.

    Raises
    ------
    TlsConfigError
        If the certificate, key or CA file cannot be read or does not match.
    """
    if not tls.enabled or tls.certificate is None or tls.private_key is None:
        return None
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = tls.certificate, tls.private_key
    _load("certificate and private key", cert, lambda: context.load_cert_chain(str(cert), str(key)))
    if tls.ca_certificates is not None:
        ca = tls.ca_certificates
        _load("CA certificates", ca, lambda: context.load_verify_locations(cafile=str(ca)))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsSection) -> ssl.SSLContext:
    """The context of outgoing TLS associations (TLS 1.2 or later).

    The peer's certificate must chain to ``tls.ca_certificates`` (only to it: the system
    CAs are trusted only when it is unset) and name the peer's configured ``host`` (DNS
    name or IP address in its subjectAltName); the node's own certificate is presented
    when configured.

    Raises
    ------
    TlsConfigError
        If the certificate, key or CA file cannot be read or does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificates is not None:
        ca = tls.ca_certificates
        _load("CA certificates", ca, lambda: context.load_verify_locations(cafile=str(ca)))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None and tls.private_key is not None:
        cert, key = tls.certificate, tls.private_key
        _load("certificate and private key", cert, lambda: context.load_cert_chain(str(cert), str(key)))
    return context


def peer_certificate_name(sock: object) -> str | None:
    """The subject common name of the certificate a TLS peer presented (``None``: none, or not TLS)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        certificate = sock.getpeercert()
    except (OSError, ValueError):
        return None
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def make_handshake_handler(timeout: float, audit: AuditLog) -> Callable[[evt.Event], None]:
    """``EVT_CONN_OPEN`` on the listening side: the TLS handshake, limited to ``timeout`` seconds.

    It runs on the new connection's thread, before the association starts. A failed
    handshake (plain TCP, no or untrusted certificate, silence) is logged and audited
    as a rejected association, and the connection is closed.
    """

    def on_connection(event: evt.Event) -> None:
        transport = event.assoc.dul.socket
        sock = getattr(transport, "socket", None)
        if not isinstance(sock, ssl.SSLSocket):
            return
        host, port = (tuple(event.address) + (None, None))[:2]
        try:
            sock.settimeout(timeout)
            sock.do_handshake()
            sock.settimeout(None)  # as pynetdicom leaves an accepted socket
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            reason = f"TLS handshake failed: {exc}"
            log.warning("connection from %s:%s refused: %s", host, port, reason)
            audit.record("association-rejected", address=host, port=port, reason=reason)
            transport.close()
            # pynetdicom still starts the association, which would wait acse_timeout for a request
            # that cannot come while holding one of node.max_associations: let it end at once
            event.assoc.acse_timeout = 0.001

    return on_connection
