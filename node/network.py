"""Network plumbing shared by the node's SCP and SCU sides: Nagle off, timeouts, peers."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass, field

from pynetdicom import AE, evt

log = logging.getLogger(__name__)

# host: a name, an IPv4 address, or an IPv6 address in brackets (``PACS@[::1]:104``)
_PEER_RE = re.compile(r"^(?P<ae>[^@]+)@(?:\[(?P<ipv6>[^\[\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class PeerAddress:
    """A remote application entity; ``tls_args`` (``(SSLContext, server_hostname)``) when reached over TLS."""

    ae_title: str
    host: str
    port: int
    tls_args: tuple[ssl.SSLContext, str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """``AE@host:port`` -> :class:`PeerAddress`; ``ValueError`` naming the text otherwise."""
        match = _PEER_RE.match(text.strip())
        if not match:
            raise ValueError(f"{text!r}: expected AE_TITLE@host:port, e.g. PACS@127.0.0.1:4242 or PACS@[::1]:4242")
        if len(match["ae"]) > 16:
            raise ValueError(f"{text!r}: the AE title {match['ae']!r} is longer than 16 characters")
        if not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{text!r}: port {match['port']} is not in 1..65535")
        if match["ipv6"] is not None:
            try:
                ipaddress.IPv6Address(match["ipv6"])  # a zone (fe80::1%eth0) included
            except ValueError:
                raise ValueError(f"{text!r}: {match['ipv6']!r} in brackets is not an IPv6 address") from None
        return cls(match["ae"], match["ipv6"] or match["host"], int(match["port"]))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def set_tcp_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: turn Nagle's algorithm off on the association's socket.

    With Nagle on, each small C-STORE stalls ~45 ms waiting for a delayed ACK.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # a socket closed in the meantime: nothing to tune
        log.debug("TCP_NODELAY not set: %s", exc)


NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]


def configure_timeouts(
    ae: AE, acse_timeout: float, dimse_timeout: float, network_timeout: float, maximum_pdu_size: int
) -> AE:
    """Apply the node's association, DIMSE and network timeouts and PDU size to an AE."""
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = min(acse_timeout, 10.0)
    ae.maximum_pdu_size = maximum_pdu_size
    return ae
