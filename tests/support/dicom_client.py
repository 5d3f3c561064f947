"""The calling side of the security tests: pynetdicom requests, DCMTK tools, audit-log polling."""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pki import Pki
from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    NuclearMedicineImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from node.audit import read_audit

NODE_AE = "SPECTNODE"


def tls_client_context(pki: Pki, with_certificate: bool = True) -> ssl.SSLContext:
    """A client context trusting the test CA, showing the test client certificate unless told not to."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if with_certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def associate(
    port: int, calling: str = "TESTSCU", contexts: Sequence[str] = (Verification,), **kwargs: Any
) -> Association:
    """An association with the node on 127.0.0.1 (``kwargs`` go to ``AE.associate``: tls_args, ext_neg...)."""
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.dimse_timeout = 30
    return ae.associate("127.0.0.1", port, **{"ae_title": NODE_AE, **kwargs})


def c_store(port: int, ds: Dataset, calling: str = "TESTSCU", **kwargs: Any) -> Dataset:
    """C-STORE one data set; the response's status data set (Status, and ErrorComment if any)."""
    assoc = associate(port, calling, (NuclearMedicineImageStorage,), **kwargs)
    assert assoc.is_established, f"association as {calling} refused"
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def c_find(port: int, calling: str, patient_id: str, **kwargs: Any) -> list[Dataset]:
    """STUDY-level C-FIND on Patient ID; every response's status data set, the final one last."""
    assoc = associate(port, calling, (StudyRootQueryRetrieveInformationModelFind,), **kwargs)
    assert assoc.is_established, f"association as {calling} refused"
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    try:
        return [status for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()


def _study_identifier(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def c_get(port: int, calling: str, study_uid: str) -> tuple[Dataset, list[str]]:
    """C-GET a study (NM and SEG instances); the final status data set and the SOP Instance UIDs received."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = associate(
        port,
        calling,
        (StudyRootQueryRetrieveInformationModelGet, NuclearMedicineImageStorage, SegmentationStorage),
        ext_neg=[build_role(c, scp_role=True) for c in (NuclearMedicineImageStorage, SegmentationStorage)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established, f"association as {calling} refused"
    try:
        responses = [
            status
            for status, _ in assoc.send_c_get(_study_identifier(study_uid), StudyRootQueryRetrieveInformationModelGet)
        ]
    finally:
        assoc.release()
    return responses[-1], received


def c_move(port: int, calling: str, study_uid: str, destination: str) -> Dataset:
    """C-MOVE a study to ``destination``; the final status data set."""
    assoc = associate(port, calling, (StudyRootQueryRetrieveInformationModelMove,))
    assert assoc.is_established, f"association as {calling} refused"
    try:
        responses = [
            status
            for status, _ in assoc.send_c_move(
                _study_identifier(study_uid), destination, StudyRootQueryRetrieveInformationModelMove
            )
        ]
    finally:
        assoc.release()
    return responses[-1]


def wait_for_event(path: Path, kind: str, timeout: float = 60.0, count: int = 1) -> list[dict[str, Any]]:
    """The audit events of ``kind`` once there are ``count`` of them (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in read_audit(path) if e["event"] == kind] if path.is_file() else []
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) >= count, f"{len(found)} {kind} event(s) in {path} after {timeout} s, expected {count}"
    return found
