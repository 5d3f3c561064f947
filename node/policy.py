"""Who may do what: per-peer services and host checks, on top of the association-level allow list.

``node.allowed_calling_ae_titles`` stays the association-level gate (pynetdicom rejects
others). A calling AE title listed in ``peers`` may use the services its entry names
(``store``, ``query``, ``retrieve``); with ``check_host`` its association must come from the
peer's configured host. Callers not listed in ``peers`` get ``node.unlisted_services``
(all three by default). C-ECHO is open to every association the gate admits. C-MOVE
destinations are always ``peers`` (see :mod:`node.qr`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset

from node.audit import AuditLog, identifier_keys

log = logging.getLogger(__name__)

SERVICES = ("store", "query", "retrieve")

# Refused: Not Authorized (0124H) is a status of C-STORE, C-GET and C-MOVE (PS3.7 9.1.1.1.9,
# 9.1.3.1.6, 9.1.4.1.7) but not of C-FIND (9.1.2.1.6), whose refusal is therefore a
# "Failed: Unable to process" status (Cxxx, PS3.4 C.4.1.1.4): 0xC124 here. Every refusal
# carries an Error Comment naming the missing permission.
REFUSED_NOT_AUTHORISED = 0x0124
UNABLE_TO_PROCESS_NOT_AUTHORISED = 0xC124


def refusal(status: int, calling_ae: str, service: str) -> Dataset:
    """The status data set of a refused request: ``status`` and an Error Comment (64 characters at most)."""
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = f"{calling_ae} is not authorised to {service}"[:64]
    return answer


@dataclass(frozen=True)
class PeerRule:
    """What one configured peer may do."""

    ae_title: str
    host: str
    services: frozenset[str]
    check_host: bool = False


class AccessPolicy:
    """Answers "may this caller use this service" and "is this caller where it should be".

    Parameters
    ----------
    rules
        Peer rules by AE title.
    unlisted_services
        Services for calling AE titles that are not peers.
    resolve
        Host name -> addresses (default: the system resolver); replaceable in tests.
    """

    def __init__(
        self,
        rules: Iterable[PeerRule] = (),
        unlisted_services: Iterable[str] = SERVICES,
        resolve: Callable[[str], set[str]] | None = None,
    ) -> None:
        self.rules: Mapping[str, PeerRule] = {rule.ae_title: rule for rule in rules}
        self.unlisted_services = frozenset(unlisted_services)
        self._resolve = resolve or _addresses

    def allows(self, calling_ae: str, service: str) -> bool:
        """Whether ``calling_ae`` may use ``service`` (one of :data:`SERVICES`)."""
        rule = self.rules.get(calling_ae.strip())
        return service in (rule.services if rule is not None else self.unlisted_services)

    def host_mismatch(self, calling_ae: str, address: str) -> str | None:
        """Why an association from ``address`` cannot be this peer, or ``None`` when it can."""
        rule = self.rules.get(calling_ae.strip())
        if rule is None or not rule.check_host:
            return None
        try:
            expected = self._resolve(rule.host)
        except (OSError, ValueError) as exc:  # ValueError: a name IDNA cannot encode ("pacs..example.org")
            return f"peer {rule.ae_title}: host {rule.host!r} does not resolve ({exc})"
        if _plain(address) not in {_plain(a) for a in expected}:
            return f"peer {rule.ae_title} is configured at {rule.host}, the association came from {address}"
        return None


def refuse_unless_allowed(
    event: Any, policy: AccessPolicy, audit: AuditLog, service: str, dimse: str
) -> Dataset | None:
    """``None`` when the caller of ``event`` may use ``service``; else the refusal to answer, logged and audited.

    ``event`` is the pynetdicom event of a ``dimse`` request (``"C-STORE"``, ``"C-FIND"``...);
    the refusal is 0xC124 for C-FIND and 0x0124 for the others, with an Error Comment.
    """
    calling = event.assoc.requestor.ae_title.strip()
    if policy.allows(calling, service):
        return None
    record_refusal(event, audit, f"{service}-refused", dimse, "not authorised", **_what_was_asked(event, dimse))
    return refusal(UNABLE_TO_PROCESS_NOT_AUTHORISED if dimse == "C-FIND" else REFUSED_NOT_AUTHORISED, calling, service)


def record_refusal(event: Any, audit: AuditLog, kind: str, dimse: str, reason: str, **asked: object) -> None:
    """Log a refused ``dimse`` request (the reason names keys, never patient values) and audit it
    as ``kind`` with the caller and ``asked`` (the keys, destination or instance it asked for)."""
    calling = event.assoc.requestor.ae_title.strip()
    log.warning("%s from %s refused: %s", dimse, calling, reason)
    audit.record(kind, calling_ae=calling, address=event.assoc.requestor.address, service=dimse, reason=reason, **asked)


def _what_was_asked(event: Any, dimse: str) -> dict[str, object]:
    """For the audit of a refusal: the instance a C-STORE carried, the keys of a query or
    retrieve and a C-MOVE's destination (whatever of it can be read)."""
    asked: dict[str, object] = {}
    try:
        if dimse == "C-STORE":
            asked["sop_instance_uid"] = str(event.request.AffectedSOPInstanceUID)
        else:
            asked["keys"] = identifier_keys(event.identifier)
        if dimse == "C-MOVE":
            asked["destination"] = str(event.move_destination or "").strip()
    except Exception:  # an undecodable request is audited without them
        log.debug("refused %s: request not decodable for the audit", dimse)
    return asked


def _addresses(host: str) -> set[str]:
    return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}


def _plain(address: str) -> str:
    """``::ffff:10.0.0.5`` (an IPv4 caller on an IPv6 socket) -> ``10.0.0.5``; other addresses unchanged."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped or parsed)
