"""Tests of storage.results: results, deliveries and their retry schedule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import (
    DeliveryState,
    Index,
    JobState,
    JobStateError,
    JobTimings,
    NewResult,
    RecordNotFoundError,
    StorageError,
    next_backoff,
)


def _result(job_id: int | None, seg_sop_uid: str = "9.1.1", study_uid: str = "1.2") -> NewResult:
    return NewResult(
        job_id=job_id,
        study_instance_uid=study_uid,
        source_series_instance_uid="1.2.3",
        seg_sop_instance_uid=seg_sop_uid,
        seg_series_instance_uid="9.1",
        path=f"dicom/{study_uid}/9.1/{seg_sop_uid}.dcm",
        myocardium_volume_ml=123.5,
        model_name="unet3d",
        model_version="1.0.0",
    )


def _running_job(index: Index, series_uid: str = "1.2.3") -> int:
    job_id = index.enqueue_job(series_uid)
    job = index.claim_job("w1")
    assert job is not None and job.id == job_id
    return job_id


def test_next_backoff_doubles_then_caps() -> None:
    assert [next_backoff(n, 2.0, 300.0) for n in range(1, 10)] == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0]
    assert next_backoff(10_000, 2.0, 300.0) == 300.0
    with pytest.raises(ValueError):
        next_backoff(0, 2.0, 300.0)


@settings(deadline=None, derandomize=True, database=None)  # a loaded CI machine must not turn time into failures
@given(st.integers(1, 200), st.floats(0.0, 1e3), st.floats(0.0, 1e5))
def test_next_backoff_is_monotonic_and_bounded(attempts: int, base_s: float, max_s: float) -> None:
    delay = next_backoff(attempts, base_s, max_s)
    assert 0.0 <= delay <= max_s
    assert next_backoff(attempts + 1, base_s, max_s) >= delay


def test_add_result_is_idempotent_per_seg_instance(index: Index) -> None:
    job_id = _running_job(index)
    first = index.add_result(_result(job_id), now=5.0)
    again = index.add_result(_result(job_id), now=6.0)
    assert again == first and first.created_at == 5.0
    assert index.result(first.id) == first
    assert index.result_for_job(job_id) == first
    assert index.result_for_job(999) is None


def test_results_filter_by_study(index: Index) -> None:
    a = index.add_result(_result(None, "9.1.1", study_uid="1.2"))
    b = index.add_result(_result(None, "9.1.2", study_uid="1.3"))
    assert index.results() == [a, b]
    assert index.results(study_uid="1.3") == [b]


def test_finish_job_with_result_records_everything_at_once(index: Index) -> None:
    job_id = _running_job(index)
    result, deliveries = index.finish_job_with_result(
        _result(job_id), ["PACS", "VIEWER"], timings=JobTimings(1.0, 2.0, 3.0), now=7.0
    )
    job = index.job(job_id)
    assert job is not None and job.state is JobState.DONE and job.infer_s == 2.0
    assert [(d.peer_ae_title, d.state, d.next_attempt_at) for d in deliveries] == [
        ("PACS", DeliveryState.PENDING, 7.0),
        ("VIEWER", DeliveryState.PENDING, 7.0),
    ]
    assert index.deliveries(result_id=result.id) == deliveries


def test_finish_job_with_result_records_nothing_for_a_finished_job(index: Index) -> None:
    job_id = _running_job(index)
    index.finish_job(job_id, JobState.FAILED, reason="crash")
    with pytest.raises(JobStateError):
        index.finish_job_with_result(_result(job_id), ["PACS"])
    assert index.results() == [] and index.deliveries() == []
    with pytest.raises(ValueError):
        index.finish_job_with_result(_result(None), ["PACS"])


def test_add_delivery_is_unique_per_result_and_peer(index: Index) -> None:
    result = index.add_result(_result(None))
    first = index.add_delivery(result.id, "PACS", now=1.0)
    assert index.add_delivery(result.id, "PACS", now=2.0) == first
    assert len(index.deliveries()) == 1
    with pytest.raises(StorageError):  # foreign key: no such result
        index.add_delivery(result.id + 100, "PACS")


def test_failed_attempts_back_off_then_succeed(index: Index) -> None:
    result = index.add_result(_result(None))
    delivery = index.add_delivery(result.id, "PACS", now=0.0)
    assert [d.id for d in index.due_deliveries(now=0.0)] == [delivery.id]
    claimed = index.claim_due_deliveries(now=0.0)
    assert [(d.id, d.state) for d in claimed] == [(delivery.id, DeliveryState.SENDING)]
    assert index.claim_due_deliveries(now=0.0) == []  # already being sent
    failed = index.mark_delivery(delivery.id, success=False, error="refused", base_s=2.0, max_s=300.0, now=10.0)
    assert (failed.state, failed.attempts, failed.next_attempt_at, failed.last_error) == (
        DeliveryState.PENDING,
        1,
        12.0,
        "refused",
    )
    assert index.due_deliveries(now=11.9) == []
    index.claim_due_deliveries(now=12.0)
    failed = index.mark_delivery(delivery.id, success=False, error="timeout", base_s=2.0, max_s=300.0, now=12.0)
    assert (failed.attempts, failed.next_attempt_at) == (2, 16.0)
    sent = index.mark_delivery(delivery.id, success=True, now=16.0)
    assert (sent.state, sent.attempts, sent.last_error) == (DeliveryState.DONE, 3, None)
    assert index.due_deliveries(now=1e9) == []
    with pytest.raises(JobStateError):
        index.mark_delivery(delivery.id, success=True)
    with pytest.raises(RecordNotFoundError):
        index.mark_delivery(999, success=True)


def test_delivery_gives_up_after_max_attempts(index: Index) -> None:
    result = index.add_result(_result(None))
    delivery = index.add_delivery(result.id, "PACS", now=0.0)
    states = [
        index.mark_delivery(delivery.id, success=False, error="down", max_attempts=3, now=float(n)).state
        for n in range(3)
    ]
    assert states == [DeliveryState.PENDING, DeliveryState.PENDING, DeliveryState.FAILED]


def test_delivery_gives_up_after_retry_window(index: Index) -> None:
    result = index.add_result(_result(None))
    delivery = index.add_delivery(result.id, "PACS", now=100.0)
    early = index.mark_delivery(delivery.id, success=False, retry_window_s=3600.0, now=200.0)
    assert early.state is DeliveryState.PENDING
    late = index.mark_delivery(delivery.id, success=False, retry_window_s=3600.0, now=3700.0)
    assert late.state is DeliveryState.FAILED
    assert index.deliveries(state="failed") == [late]


def test_stale_sending_deliveries_are_pending_again(index: Index) -> None:
    result = index.add_result(_result(None))
    delivery = index.add_delivery(result.id, "PACS", now=0.0)
    index.claim_due_deliveries(now=0.0)
    recovered = index.requeue_stale_deliveries(now=50.0)
    assert [(d.id, d.state, d.next_attempt_at) for d in recovered] == [(delivery.id, DeliveryState.PENDING, 50.0)]
    assert index.requeue_stale_deliveries() == []
