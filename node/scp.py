"""The node's DICOM server: association policy and thin DIMSE handlers.

Handlers get their collaborators through ``evt_handlers`` extra arguments, catch
everything, and answer a DIMSE status; no heavy work runs on an association thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

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

from node.network import NODELAY_HANDLERS, PeerAddress
from node.qr import QR_SOP_CLASSES, handle_find, handle_get, handle_move
from storage import Storage

log = logging.getLogger(__name__)

# DIMSE statuses (PS3.4 Annex B / PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
REFUSED_NOT_AUTHORIZED = 0x0124

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


def handle_store(event: evt.Event, sink: InstanceSink) -> int:
    """C-STORE: write the bytes as they came, index them, then answer.

    Success is only answered once the instance is on disk and indexed; any failure of
    the sink becomes a failure status, never an exception on the association thread.
    """
    try:
        request = event.request
        context = event.context
        encoded = event.encoded_dataset(include_meta=True)
        return sink.store(
            encoded,
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(context.transfer_syntax),
            event.assoc.requestor.ae_title.strip(),
        )
    except Exception:  # the handler must answer, whatever went wrong
        log.exception("C-STORE handling failed")
        return OUT_OF_RESOURCES


def make_association_check(allowed_calling_ae_titles: Sequence[str]) -> Callable[[evt.Event], None]:
    """``EVT_REQUESTED`` logging of association requests (AE-title policy is applied by the AE)."""

    def on_requested(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.info(
            "association requested by %s from %s:%s", requestor.ae_title.strip(), requestor.address, requestor.port
        )

    return on_requested


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


def server_handlers(sink: InstanceSink, storage: Storage, peers: Mapping[str, PeerAddress]) -> list:
    """The event handlers bound when the server starts.

    ``storage`` answers queries and holds the files to retrieve; ``peers``
    (AE title -> address) are the only C-MOVE destinations.
    """
    return [
        *NODELAY_HANDLERS,
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [sink]),
        (evt.EVT_C_FIND, handle_find, [storage]),
        (evt.EVT_C_GET, handle_get, [storage]),
        (evt.EVT_C_MOVE, handle_move, [storage, peers]),
    ]
