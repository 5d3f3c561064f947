"""The result sender: what counts as delivered, and a sender that survives what goes wrong."""

from __future__ import annotations

import threading
from pathlib import Path

from node.network import PeerAddress
from node.scu import SendOutcome, Timeouts, stored
from node.sender import ResultSender, RetryPolicy
from storage import Storage
from storage.records import DeliveryState, NewResult


def test_warning_statuses_mean_stored() -> None:
    assert all(stored(s) for s in (0x0000, 0xB000, 0xB006, 0xB007))
    assert not any(stored(s) for s in (0xA700, 0xA900, 0xC000, 0x0122, 0x0110))
    assert SendOutcome({"1.2": 0xB000}).all_succeeded
    assert not SendOutcome({"1.2": 0xB000, "1.3": 0xA700}).all_succeeded


def _sender(storage: Storage) -> ResultSender:
    peers = {"PACS": PeerAddress("PACS", "127.0.0.1", 9)}
    return ResultSender(storage, peers, "SPECTNODE", Timeouts(acse=1, dimse=1, network=1), RetryPolicy())


def test_an_unreadable_seg_file_is_a_failed_attempt_and_the_sender_goes_on(tmp_path: Path) -> None:
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
        sender = _sender(storage)
        assert sender.send_due() == 1  # no exception
        record = storage.index.delivery(delivery.id)
        assert record is not None and record.state is not DeliveryState.SENDING and record.attempts == 1
        assert "missing.dcm" in (record.last_error or "")
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
