"""DICOM TLS (PS3.15 Annex B): SSL contexts for the listening port and for outgoing associations."""

from __future__ import annotations

import ssl
from pathlib import Path

from config.schema import NodeSection


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file."""


def _load(action: str, path: Path, call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"{path}: cannot load the {action}: {exc}") from exc


def server_context(node: NodeSection) -> ssl.SSLContext | None:
    """The listening port's context (TLS 1.2+), or ``None`` when no certificate is configured.

    With ``tls_ca_certificates`` clients presenting a certificate are verified against it;
    ``tls_require_client_certificate`` refuses clients without one.
    """
    if node.tls_certificate is None or node.tls_private_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = node.tls_certificate, node.tls_private_key
    _load("certificate and key", cert, lambda: context.load_cert_chain(str(cert), str(key)))
    if node.tls_ca_certificates is not None:
        ca = node.tls_ca_certificates
        _load("CA certificates", ca, lambda: context.load_verify_locations(cafile=str(ca)))
        context.verify_mode = ssl.CERT_REQUIRED if node.tls_require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(node: NodeSection) -> ssl.SSLContext:
    """The context of outgoing TLS associations: the peer is verified against ``tls_ca_certificates``
    (system CAs when unset), and the node's own certificate is presented when configured."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if node.tls_ca_certificates is not None:
        ca = node.tls_ca_certificates
        _load("CA certificates", ca, lambda: context.load_verify_locations(cafile=str(ca)))
    if node.tls_certificate is not None and node.tls_private_key is not None:
        cert, key = node.tls_certificate, node.tls_private_key
        _load("certificate and key", cert, lambda: context.load_cert_chain(str(cert), str(key)))
    return context
