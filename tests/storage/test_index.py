"""Tests of storage.index: instances, series assembly state, idempotent upserts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import (
    SEGMENT_JOB,
    Index,
    InstanceRecord,
    JobState,
    RecordNotFoundError,
    SeriesState,
    StorageError,
    StorageFullError,
)

RecordFactory = Callable[..., InstanceRecord]


def test_add_instance_round_trips_every_field(index: Index, make_record: RecordFactory) -> None:
    record = make_record(
        "1.2.3.1.1",
        image_type="ORIGINAL\\PRIMARY\\RECON TOMO",
        is_result=True,
        number_of_frames=56,
        series_number=3,
        study_date="20240101",
    )
    assert index.add_instance(record) is True
    assert index.instance("1.2.3.1.1") == record
    assert index.instance("9.9") is None


def test_resent_instance_updates_without_duplicating(index: Index, make_record: RecordFactory) -> None:
    assert index.add_instance(make_record("1.1", received_at=10.0)) is True
    assert index.add_instance(make_record("1.1", received_at=20.0, size_bytes=2000)) is False
    rows = index.instances_for_series("1.2.3.1")
    assert len(rows) == 1 and rows[0].size_bytes == 2000
    series = index.series("1.2.3.1")
    assert series is not None
    assert series.n_instances == 1
    assert (series.first_received_at, series.last_received_at) == (10.0, 20.0)


def test_series_is_created_and_counted(index: Index, make_record: RecordFactory) -> None:
    for number, received_at in ((3, 12.0), (1, 10.0), (2, 11.0)):
        index.add_instance(make_record(f"1.1.{number}", instance_number=number, received_at=received_at))
    index.add_instance(make_record("1.1.9", instance_number=None, received_at=13.0))
    series = index.series("1.2.3.1")
    assert series is not None
    assert series.n_instances == 4 and series.state is SeriesState.RECEIVING
    assert series.study_instance_uid == "1.2.3" and series.modality == "NM"
    assert (series.first_received_at, series.last_received_at) == (10.0, 13.0)
    ordered = [r.sop_instance_uid for r in index.instances_for_series("1.2.3.1")]
    assert ordered == ["1.1.1", "1.1.2", "1.1.3", "1.1.9"]
    assert index.series("no.such") is None


def test_idle_series_are_found_by_cutoff(index: Index, make_record: RecordFactory) -> None:
    index.add_instance(make_record("1.1", series_uid="1.1", received_at=100.0))
    index.add_instance(make_record("2.1", series_uid="2.1", received_at=200.0))
    index.add_instance(make_record("3.1", series_uid="3.1", received_at=50.0, is_result=True))
    assert [s.series_instance_uid for s in index.series_idle_since(150.0)] == ["1.1"]
    assert [s.series_instance_uid for s in index.series_idle_since(200.0)] == ["1.1", "2.1"]
    with_results = index.series_idle_since(200.0, include_results=True)
    assert [s.series_instance_uid for s in with_results] == ["3.1", "1.1", "2.1"]
    index.mark_series_complete("1.1", now=300.0)
    assert [s.series_instance_uid for s in index.series_idle_since(1000.0)] == ["2.1"]


def test_mark_series_complete_queues_one_job(index: Index, make_record: RecordFactory) -> None:
    index.add_instance(make_record("1.1"))
    job_id = index.mark_series_complete("1.2.3.1", job_kind=SEGMENT_JOB, now=50.0)
    again = index.mark_series_complete("1.2.3.1", job_kind=SEGMENT_JOB, now=60.0)
    assert job_id is not None and again == job_id
    series = index.series("1.2.3.1")
    assert series is not None and series.state is SeriesState.COMPLETE
    assert series.completed_at == 50.0
    jobs = index.jobs_for_series("1.2.3.1")
    assert [(j.id, j.state, j.kind) for j in jobs] == [(job_id, JobState.QUEUED, SEGMENT_JOB)]
    assert index.mark_series_complete("1.2.3.1") is None


def test_an_idle_sweep_does_not_complete_a_series_an_instance_has_just_reached(
    index: Index, make_record: RecordFactory
) -> None:
    index.add_instance(make_record("1.1", received_at=10.0))
    (idle,) = index.series_idle_since(100.0)  # the sweep's snapshot ...
    index.add_instance(make_record("1.2", received_at=101.0))  # ... then an instance lands
    assert index.mark_series_complete("1.2.3.1", SEGMENT_JOB, now=102.0, idle_since=idle.last_received_at) is None
    series = index.series("1.2.3.1")
    assert series is not None and series.state is SeriesState.RECEIVING and index.jobs_for_series("1.2.3.1") == []
    assert index.mark_series_complete("1.2.3.1", SEGMENT_JOB, now=200.0, idle_since=101.0) is not None


def test_a_series_completed_twice_gets_one_job_even_after_it_ran(index: Index, make_record: RecordFactory) -> None:
    """Two stores reaching the announced count at once, or an idle sweep that looked before the
    last instance landed, complete the series a second time after its job ran: still one job."""
    index.add_instance(make_record("1.1", received_at=10.0))
    (idle,) = index.series_idle_since(100.0)  # the sweep's snapshot, then the series completes ...
    job = index.mark_series_complete("1.2.3.1", SEGMENT_JOB, now=101.0)
    assert job is not None
    index.claim_job("w1", now=102.0)
    index.finish_job(job, JobState.DONE, now=103.0)  # ... and its job runs before the sweep writes
    assert index.mark_series_complete("1.2.3.1", SEGMENT_JOB, now=104.0, idle_since=idle.last_received_at) is None
    assert index.mark_series_complete("1.2.3.1", SEGMENT_JOB, now=105.0) == job  # the other store's call
    assert [j.id for j in index.jobs_for_series("1.2.3.1")] == [job]


def test_a_re_send_retries_a_series_whose_job_failed_and_only_then(index: Index, make_record: RecordFactory) -> None:
    index.add_instance(make_record("1.1", received_at=10.0))
    job = index.mark_series_complete("1.2.3.1", SEGMENT_JOB, now=20.0)
    assert job is not None
    index.claim_job("w1", now=30.0)
    index.finish_job(job, JobState.DONE, now=40.0)
    index.add_instance(make_record("1.1", received_at=50.0))  # re-sent after a good job: nothing to do
    assert index.series_idle_since(1000.0) == []
    retried = index.enqueue_job("1.2.3.1", SEGMENT_JOB, now=60.0)  # spect-node reprocess
    assert retried is not None and retried != job
    index.claim_job("w1", now=70.0)
    index.finish_job(retried, JobState.FAILED, reason="corrupt slice", now=80.0)
    index.add_instance(make_record("1.1", received_at=90.0))  # re-sent after a failure: processed again
    assert [s.series_instance_uid for s in index.series_idle_since(1000.0)] == ["1.2.3.1"]


def test_the_nodes_own_seg_sent_back_stays_a_result(index: Index, make_record: RecordFactory) -> None:
    index.add_instance(make_record("9.1", series_uid="9.9", is_result=True, calling_ae_title=None))
    assert index.add_instance(make_record("9.1", series_uid="9.9", is_result=False)) is False  # the PACS echoes it
    record = index.instance("9.1")
    assert record is not None and record.is_result


def test_mark_unknown_series_complete_raises(index: Index) -> None:
    with pytest.raises(RecordNotFoundError):
        index.mark_series_complete("no.such", job_kind=SEGMENT_JOB)
    assert index.jobs() == []


def test_new_instance_reopens_a_complete_series(index: Index, make_record: RecordFactory) -> None:
    index.add_instance(make_record("1.1"))
    index.mark_series_complete("1.2.3.1", now=10.0)
    index.add_instance(make_record("1.1", received_at=20.0))  # a re-send: stays complete
    series = index.series("1.2.3.1")
    assert series is not None and series.state is SeriesState.COMPLETE
    index.add_instance(make_record("1.2", received_at=30.0))  # a late new instance
    series = index.series("1.2.3.1")
    assert series is not None
    assert series.state is SeriesState.RECEIVING and series.completed_at is None
    assert series.n_instances == 2


def test_instance_moved_to_another_series_updates_both_counts(index: Index, make_record: RecordFactory) -> None:
    index.add_instance(make_record("1.1", series_uid="1.1"))
    index.add_instance(make_record("1.2", series_uid="1.1"))
    assert index.add_instance(make_record("1.2", series_uid="2.1")) is False
    first, second = index.series("1.1"), index.series("2.1")
    assert first is not None and second is not None
    assert (first.n_instances, second.n_instances) == (1, 1)


def test_expected_instances(index: Index, make_record: RecordFactory) -> None:
    index.add_instance(make_record("1.1"))
    index.set_expected_instances("1.2.3.1", 56)
    series = index.series("1.2.3.1")
    assert series is not None and series.expected_instances == 56
    with pytest.raises(RecordNotFoundError):
        index.set_expected_instances("no.such", 1)


def test_failed_write_rolls_back_everything(index: Index, make_record: RecordFactory) -> None:
    with pytest.raises(StorageError):
        index.add_instance(make_record("1.1", size_bytes=-1))  # violates a CHECK constraint
    assert index.instance("1.1") is None and index.series("1.2.3.1") is None


def test_a_full_index_file_is_told_apart_from_other_errors_and_loses_nothing(
    index: Index, make_record: RecordFactory
) -> None:
    conn = index._db.connection()  # this thread's connection, the one the writes below use
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLite's own SQLITE_FULL, as on a full disk
    added = []
    with pytest.raises(StorageFullError, match="index database full"):
        for n in range(10_000):
            index.add_instance(make_record(f"1.{n}", patient_name="X" * 500))
            added.append(f"1.{n}")
    assert added and all(index.instance(uid) is not None for uid in added)  # the full write rolled back alone
    assert index.series("1.2.3.1").n_instances == len(added)
    conn.execute("PRAGMA max_page_count = 1073741823")
    index.add_instance(make_record("1.last"))  # room again: writes go on
    assert index.instance("1.last") is not None


def test_other_threads_share_the_index(index: Index, make_record: RecordFactory) -> None:
    errors: list[BaseException] = []

    def add(uid: str) -> None:
        try:
            index.add_instance(make_record(uid))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(f"1.{n}",)) for n in range(20)]
    for thread in threads:
        thread.start()
        thread.join()  # one after the other: each thread ends before the next starts
    assert errors == []
    assert len(index.instances_for_series("1.2.3.1")) == 20
    # connections of ended threads are closed, not kept until close()
    assert len(index._db._by_thread) <= 2


def test_closed_index_refuses_use(tmp_path: Path, make_record: RecordFactory) -> None:
    opened = Index.open(tmp_path / "index.sqlite3")
    opened.close()
    with pytest.raises(StorageError, match="closed"):
        opened.add_instance(make_record("1.1"))


def test_index_reopens_with_its_rows(tmp_path: Path, make_record: RecordFactory) -> None:
    path = tmp_path / "index.sqlite3"
    with Index.open(path) as first:
        first.add_instance(make_record("1.1"))
    with Index.open(path) as second:
        assert second.instance("1.1") == make_record("1.1")
