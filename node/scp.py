"""The node's DICOM server: association policy and thin DIMSE handlers.

Handlers get their collaborators through ``evt_handlers`` extra arguments, catch
everything, and answer a DIMSE status; no heavy work runs on an association thread.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    EnhancedPETImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SegmentationStorage,
    Verification,
)

from node.audit import AuditLog
from node.network import NODELAY_HANDLERS, PeerAddress
from node.policy import AccessPolicy, refuse_unless_allowed
from node.qr import QR_SOP_CLASSES, handle_find, handle_get, handle_move
from node.tls import make_handshake_handler, peer_certificate_name
from storage import Storage

log = logging.getLogger(__name__)

# DIMSE statuses (PS3.4 Annex B / PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_LOW_DISK = (0x02, 0x03, 0x02)  # transient; service provider (presentation); local limit exceeded
REJECT_WRONG_HOST = (0x01, 0x01, 0x03)  # permanent; service user; calling AE title not recognised

# SOP classes the node stores: reconstructed SPECT arrives as NM (multi-frame or one
# slice per file) or as a CT/PET-like single-frame series; the node's own results are SEG.
STORAGE_CLASSES: tuple[str, ...] = (
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage (stored, not processed)
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (stored, not processed)
    SegmentationStorage,
)
# Explicit VR Little Endian first: the SCP takes the first of its own syntaxes that the peer offers.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]


class InstanceSink(Protocol):
    """Where received instances go (implemented by the node's receiver)."""

    def store(
        self, encoded: bytes, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_ae: str
    ) -> int:
        """Persist and index one instance; return the DIMSE status to answer."""
        ...


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: the node is up."""
    return SUCCESS


def handle_store(event: evt.Event, sink: InstanceSink, policy: AccessPolicy, audit: AuditLog) -> int | Dataset:
    """C-STORE: write the bytes as they came, index them, then answer.

    Success is only answered once the instance is on disk and indexed; any failure of
    the sink becomes a failure status, never an exception on the association thread.
    A caller whose peer rule lacks ``store`` gets 0x0124 (Refused: Not Authorized) with an
    Error Comment, and nothing is written.
    """
    try:
        if (refused := refuse_unless_allowed(event, policy, audit, "store", "C-STORE")) is not None:
            return refused
        request = event.request
        encoded = event.encoded_dataset(include_meta=True)
        return sink.store(
            encoded,
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            event.assoc.requestor.ae_title.strip(),
        )
    except Exception:  # the handler must answer, whatever went wrong
        log.exception("C-STORE handling failed")
        return OUT_OF_RESOURCES


def make_association_check(storage: Storage, policy: AccessPolicy, audit: AuditLog) -> Callable[[evt.Event], None]:
    """``EVT_REQUESTED``: log the request; reject it when disk space is low or a peer calls from elsewhere.

    Low disk space (below ``storage.min_free_bytes``) gives a *transient* rejection, so the
    sender retries later instead of handing over data the node cannot keep. AE-title
    allow lists and the called AE title are checked by pynetdicom itself. The check fails
    closed: pynetdicom ignores an exception in this handler and would accept, so an error
    in it rejects the association (transient, as a passing trouble).
    """

    def on_requested(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        calling = str(requestor.primitive.calling_ae_title or "").strip()  # requestor.ae_title is set later
        log.info("association requested by %s from %s:%s", calling, requestor.address, requestor.port)
        reason, rejection = None, None
        try:
            free = storage.free_bytes_if_low()
            if free is not None:
                reason = f"low disk space ({free} bytes free, {storage.min_free_bytes} required)"
                rejection = REJECT_LOW_DISK
            elif (mismatch := policy.host_mismatch(calling, requestor.address)) is not None:
                reason, rejection = mismatch, REJECT_WRONG_HOST
        except Exception as exc:
            log.exception("association check failed")
            reason, rejection = f"the association check failed ({type(exc).__name__}: {exc})", REJECT_LOW_DISK
        if rejection is None:
            return
        log.warning("association from %s (%s) rejected: %s", calling, requestor.address, reason)
        audit.record(
            "association-rejected", calling_ae=calling, address=requestor.address, port=requestor.port, reason=reason
        )
        event.assoc.acse.send_reject(*rejection)
        event.assoc.kill()  # as pynetdicom does after its own rejections: the A-ASSOCIATE-RJ goes out first

    return on_requested


# A-ASSOCIATE-RJ (source, reason) -> what it means, for the audit log (PS3.8 9.3.4)
_REJECT_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given (ACSE)",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded (too many associations)",
}


def make_association_audit(audit: AuditLog) -> list:
    """``EVT_ACCEPTED``/``EVT_REJECTED`` handlers writing the outcome of each association to the audit log.

    An accepted TLS association also records the subject common name of the caller's
    certificate (``tls_client``; empty when it showed none).
    """

    def outcome(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        accepted = event.event is evt.EVT_ACCEPTED
        sock = getattr(event.assoc.dul.socket, "socket", None)
        tls = isinstance(sock, ssl.SSLSocket)
        reason = None
        if not accepted:
            primitive = event.assoc.acceptor.primitive
            key = (getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None))
            reason = _REJECT_REASONS.get(key, "rejected by the association policy")  # type: ignore[arg-type]
        audit.record(
            "association-accepted" if accepted else "association-rejected",
            calling_ae=requestor.ae_title.strip(),
            called_ae=str(requestor.primitive.called_ae_title or "").strip(),  # the one asked for
            address=requestor.address,
            port=requestor.port,
            tls=tls or None,
            tls_client=(peer_certificate_name(sock) or "") if tls and accepted else None,
            reason=reason,
        )

    return [(evt.EVT_ACCEPTED, outcome), (evt.EVT_REJECTED, outcome)]


def build_ae(
    ae_title: str,
    max_associations: int,
    allowed_calling_ae_titles: Sequence[str],
    storage_classes: Sequence[str] = STORAGE_CLASSES,
) -> AE:
    """An AE that accepts Verification, Storage of the classes the node handles, and Query/Retrieve.

    Storage contexts accept both roles, so that a C-GET requestor proposing
    the SCP role for them receives the instances on its own association
    (a plain C-STORE requestor keeps the default roles). A non-empty allow list
    rejects other calling AE titles at association (A-ASSOCIATE-RJ, "calling
    AE title not recognised").
    """
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.require_called_aet = True
    if allowed_calling_ae_titles:
        ae.require_calling_aet = list(allowed_calling_ae_titles)
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
    for sop_class in storage_classes:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for sop_class in QR_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


def server_handlers(
    sink: InstanceSink,
    storage: Storage,
    peers: Mapping[str, PeerAddress],
    policy: AccessPolicy | None = None,
    audit: AuditLog | None = None,
    tls_handshake_timeout: float = 30.0,
) -> list:
    """The event handlers bound when the server starts.

    ``storage`` answers queries and holds the files to retrieve; ``peers``
    (AE title -> address) are the only C-MOVE destinations; ``policy`` says who may
    use which service (default: everyone everything); ``audit`` records who did what.
    On a TLS port the handshake of each connection runs on its own thread, for at most
    ``tls_handshake_timeout`` seconds (:func:`node.tls.make_handshake_handler`).
    """
    policy = policy or AccessPolicy()
    audit = audit or AuditLog(None)
    return [
        (evt.EVT_CONN_OPEN, make_handshake_handler(tls_handshake_timeout, audit)),
        *NODELAY_HANDLERS,
        (evt.EVT_REQUESTED, make_association_check(storage, policy, audit)),
        *make_association_audit(audit),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [sink, policy, audit]),
        (evt.EVT_C_FIND, handle_find, [storage, policy, audit]),
        (evt.EVT_C_GET, handle_get, [storage, policy, audit]),
        (evt.EVT_C_MOVE, handle_move, [storage, peers, policy, audit]),
    ]
