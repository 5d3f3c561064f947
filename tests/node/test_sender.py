"""The result sender: what counts as delivered, retries, and destinations that refuse the SEG.

Real peers on 127.0.0.1: DCMTK ``storescp`` (refusing associations with ``--refuse``,
then storing); a pynetdicom SCP stands in only to answer a C-STORE with a failure status,
which no DCMTK tool does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import storescp
from pynetdicom import AE, evt
from pynetdicom.sop_class import SegmentationStorage
from studies import free_port

from node.audit import AuditLog, read_audit
from node.convert import series_to_nifti
from node.network import PeerAddress
from node.nm_writer import dataset_to_bytes, nifti_to_nm
from node.scp import SUCCESS, TRANSFER_SYNTAXES
from node.scu import SendOutcome, Timeouts, stored
from node.seg_encode import build_seg
from node.sender import ResultSender, RetryPolicy
from storage import Storage
from storage.records import DeliveryRecord, DeliveryState, NewResult

DESTINATION_AE = "DESTSCP"
OUT_OF_RESOURCES = 0xA700
SHORT = Timeouts(acse=5, dimse=5, network=5)


def test_warning_statuses_mean_stored() -> None:
    assert all(stored(s) for s in (0x0000, 0xB000, 0xB006, 0xB007))
    assert not any(stored(s) for s in (0xA700, 0xA900, 0xC000, 0x0122, 0x0110))
    assert SendOutcome({"1.2": 0xB000}).all_succeeded
    assert not SendOutcome({"1.2": 0xB000, "1.3": 0xA700}).all_succeeded
    assert SendOutcome({"1.2": 0xB000, "1.3": 0xA700}).failure() == "peer answered 0xA700 for 1.3 (not stored)"


def _sender(storage: Storage, policy: RetryPolicy | None = None) -> ResultSender:
    peers = {"PACS": PeerAddress("PACS", "127.0.0.1", 9)}
    return ResultSender(storage, peers, "SPECTNODE", Timeouts(acse=1, dimse=1, network=1), policy or RetryPolicy())


def test_an_unreadable_seg_file_is_a_failed_attempt_retried_until_given_up(tmp_path: Path) -> None:
    """A failed attempt is retried after the policy's backoff, then given up after ``max_attempts``."""
    storage = Storage.open(tmp_path / "store")
    try:
        result = storage.index.add_result(
            NewResult(
                job_id=None,
                study_instance_uid="1.2",
                source_series_instance_uid="1.2.1",
                seg_sop_instance_uid="1.2.9.1",
                seg_series_instance_uid="1.2.9",
                path="results/missing.dcm",
                myocardium_volume_ml=None,
                model_name="m",
                model_version="1",
            )
        )
        delivery = storage.index.add_delivery(result.id, "PACS")
        policy = RetryPolicy(max_attempts=3, base_s=60.0, max_s=600.0)
        sender = _sender(storage, policy)
        assert sender.send_due() == 1  # no exception
        record = _delivery(storage, delivery.id)
        assert (record.state, record.attempts) == (DeliveryState.PENDING, 1)
        assert "missing.dcm" in (record.last_error or "")
        assert record.next_attempt_at == pytest.approx(record.updated_at + policy.base_s)
        assert sender.send_due(now=record.next_attempt_at - 1) == 0  # not before the backoff
        assert sender.send_due(now=record.next_attempt_at) == 1
        record = _delivery(storage, delivery.id)
        assert (record.state, record.attempts) == (DeliveryState.PENDING, 2)
        assert record.next_attempt_at == pytest.approx(record.updated_at + 2 * policy.base_s)
        assert sender.send_due(now=record.next_attempt_at) == 1
        record = _delivery(storage, delivery.id)
        assert (record.state, record.attempts) == (DeliveryState.FAILED, 3)  # max_attempts: given up
        assert "missing.dcm" in (record.last_error or "")
        assert sender.send_due(now=record.next_attempt_at + 1e6) == 0  # never tried again
    finally:
        storage.close()


def test_the_sender_loop_outlives_an_index_error(tmp_path: Path) -> None:
    storage = Storage.open(tmp_path / "store")
    try:
        sender = _sender(storage)
        calls = []

        def failing(now: float | None = None, limit: int = 100) -> list:
            calls.append(now)
            if len(calls) == 1:
                raise RuntimeError("database is locked")
            sender.stop_event.set()
            return []

        storage.index.claim_due_deliveries = failing  # type: ignore[method-assign]
        thread = threading.Thread(target=sender.run, kwargs={"poll_interval": 0.05})
        thread.start()
        thread.join(timeout=5)
        assert not thread.is_alive() and len(calls) == 2  # the error was logged, the loop went on
    finally:
        storage.close()


# --- destinations that refuse the SEG ---------------------------------------------------------


def _delivery(storage: Storage, delivery_id: int) -> DeliveryRecord:
    record = storage.index.delivery(delivery_id)
    assert record is not None
    return record


@pytest.fixture
def seg_result(tmp_path: Path, nm_phantom) -> Iterator[tuple[Storage, int, str]]:
    """A storage holding one real SEG result with a pending delivery to ``DESTINATION_AE``.

    Yields ``(storage, delivery_id, seg_sop_instance_uid)``.
    """
    image, _ = nm_phantom("axial")
    source = pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(
            dataset_to_bytes(nifti_to_nm(image, patient_name="Send^Refused", patient_id="SENDREF"))
        )
    )
    series = series_to_nifti([source])
    seg = build_seg(
        [source],
        np.asarray(series.image.get_fdata() > 60),
        converted_series_refs=series.references,
        series_number=901,
        series_description="LV myocardium",
        content_description="LV myocardium (U-Net)",
        algorithm_name="spect-node 3D U-Net",
        algorithm_version="0.1.0+test",
        manufacturer="spect-node",
    )
    storage = Storage.open(tmp_path / "store")
    try:
        record, _ = storage.store_instance(dataset_to_bytes(seg), seg, calling_ae_title=None, is_result=True)
        result = storage.index.add_result(
            NewResult(
                job_id=None,
                study_instance_uid=str(seg.StudyInstanceUID),
                source_series_instance_uid=str(source.SeriesInstanceUID),
                seg_sop_instance_uid=str(seg.SOPInstanceUID),
                seg_series_instance_uid=str(seg.SeriesInstanceUID),
                path=record.path,
                myocardium_volume_ml=1.0,
                model_name="m",
                model_version="1",
            )
        )
        delivery = storage.index.add_delivery(result.id, DESTINATION_AE)
        yield storage, delivery.id, str(seg.SOPInstanceUID)
    finally:
        storage.close()


def _destination_sender(storage: Storage, port: int, policy: RetryPolicy, audit: AuditLog) -> ResultSender:
    peers = {DESTINATION_AE: PeerAddress(DESTINATION_AE, "127.0.0.1", port)}
    return ResultSender(storage, peers, "SPECTNODE", SHORT, policy, audit)


def _audit_events(path: Path, event: str) -> list[dict]:
    return [record for record in read_audit(path) if record["event"] == event]


def test_a_destination_refusing_the_association_is_retried_until_it_accepts(
    tmp_path: Path, seg_result: tuple[Storage, int, str]
) -> None:
    storage, delivery_id, seg_uid = seg_result
    port, audit_path = free_port(), tmp_path / "audit.jsonl"
    audit = AuditLog(audit_path)
    policy = RetryPolicy(max_attempts=5, base_s=60.0, max_s=600.0)
    sender = _destination_sender(storage, port, policy, audit)
    try:
        with storescp(tmp_path / "refusing", port, DESTINATION_AE, "--refuse") as refusing:
            assert sender.send_due() == 1
            record = _delivery(storage, delivery_id)
            assert (record.state, record.attempts) == (DeliveryState.PENDING, 1)  # not delivered, retried later
            assert f"association rejected by {DESTINATION_AE}@127.0.0.1:{port}" in (record.last_error or "")
            assert list(refusing.iterdir()) == []
        (failed,) = _audit_events(audit_path, "seg-send-failed")
        assert (failed["attempt"], failed["state"], failed["seg_sop_instance_uid"]) == (1, "pending", seg_uid)
        assert "rejected" in failed["error"]
        assert not _audit_events(audit_path, "seg-sent")

        with storescp(tmp_path / "accepting", port, DESTINATION_AE) as accepting:
            assert sender.send_due(now=record.next_attempt_at) == 1
            record = _delivery(storage, delivery_id)
            assert (record.state, record.attempts, record.last_error) == (DeliveryState.DONE, 2, None)
            (kept,) = list(accepting.iterdir())
            assert str(pydicom.dcmread(kept).SOPInstanceUID) == seg_uid
        (sent,) = _audit_events(audit_path, "seg-sent")
        assert (sent["attempt"], sent["state"]) == (2, "done")
        assert sender.send_due(now=record.next_attempt_at + 1e6) == 0  # delivered: never sent again
    finally:
        audit.close()


def test_a_destination_that_keeps_refusing_is_given_up_after_max_attempts(
    tmp_path: Path, seg_result: tuple[Storage, int, str]
) -> None:
    storage, delivery_id, _ = seg_result
    port = free_port()
    sender = _destination_sender(storage, port, RetryPolicy(max_attempts=2, base_s=60.0), AuditLog(None))
    with storescp(tmp_path / "refusing", port, DESTINATION_AE, "--refuse"):
        assert sender.send_due() == 1
        record = _delivery(storage, delivery_id)
        assert sender.send_due(now=record.next_attempt_at) == 1
        record = _delivery(storage, delivery_id)
        assert (record.state, record.attempts) == (DeliveryState.FAILED, 2)
        assert "association rejected" in (record.last_error or "")
        assert sender.send_due(now=record.next_attempt_at + 1e6) == 0


class FailingStoreScp:
    """A storage SCP answering each C-STORE with ``status`` (settable); counts the C-STOREs it answered."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.answered: list[tuple[str, int]] = []
        ae = AE(ae_title=DESTINATION_AE)
        ae.add_supported_context(SegmentationStorage, TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        self.answered.append((str(event.request.AffectedSOPInstanceUID), self.status))
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def failing_scp() -> Iterator[FailingStoreScp]:
    server = FailingStoreScp(OUT_OF_RESOURCES)
    yield server
    server.stop()


def test_a_failure_status_is_not_delivered_and_the_seg_is_sent_again(
    tmp_path: Path, seg_result: tuple[Storage, int, str], failing_scp: FailingStoreScp
) -> None:
    storage, delivery_id, seg_uid = seg_result
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(audit_path)
    policy = RetryPolicy(max_attempts=5, base_s=60.0, max_s=600.0)
    sender = _destination_sender(storage, failing_scp.port, policy, audit)
    try:
        assert sender.send_due() == 1
        record = _delivery(storage, delivery_id)
        assert (record.state, record.attempts) == (DeliveryState.PENDING, 1)  # answered, but not stored
        assert record.last_error == f"peer answered 0xA700 for {seg_uid} (not stored)"
        (failed,) = _audit_events(audit_path, "seg-send-failed")
        assert "0xA700" in failed["error"]

        failing_scp.status = SUCCESS  # the destination has room again
        assert sender.send_due(now=record.next_attempt_at) == 1
        record = _delivery(storage, delivery_id)
        assert (record.state, record.attempts, record.last_error) == (DeliveryState.DONE, 2, None)
        assert failing_scp.answered == [(seg_uid, OUT_OF_RESOURCES), (seg_uid, SUCCESS)]
        assert len(_audit_events(audit_path, "seg-sent")) == 1
    finally:
        audit.close()
