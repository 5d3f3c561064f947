"""Tests of storage.jobs: enqueue, claim, finish, requeue, crash recovery."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from storage import Index, InstanceRecord, JobState, JobStateError, JobTimings, RecordNotFoundError
from storage.jobs import SEGMENT_JOB


def test_enqueue_is_idempotent_while_a_job_is_active(index: Index) -> None:
    first = index.enqueue_job("1.1", now=1.0)
    assert index.enqueue_job("1.1", now=2.0) == first
    claimed = index.claim_job("w1", now=3.0)
    assert claimed is not None and claimed.id == first
    assert index.enqueue_job("1.1", now=4.0) == first  # running counts as active
    index.finish_job(first, JobState.DONE, now=5.0)
    second = index.enqueue_job("1.1", now=6.0)  # finished: a new job may be queued
    assert second != first
    assert index.enqueue_job("1.1", kind="other") not in (first, second)


def test_claim_takes_the_oldest_due_job_once(index: Index) -> None:
    ids = [index.enqueue_job(f"1.{n}", now=float(n)) for n in range(3)]
    claimed = [index.claim_job("w1", now=10.0) for _ in range(4)]
    assert [job.id for job in claimed if job is not None] == ids
    assert claimed[-1] is None
    job = claimed[0]
    assert job is not None
    assert (job.state, job.claimed_by, job.started_at, job.attempts) == (JobState.RUNNING, "w1", 10.0, 1)


def test_claim_filters_by_kind(index: Index) -> None:
    index.enqueue_job("1.1", kind="other")
    wanted = index.enqueue_job("1.2", kind="segment")
    job = index.claim_job("w1", kinds=["segment"])
    assert job is not None and job.id == wanted
    assert index.claim_job("w1", kinds=["segment"]) is None
    assert index.claim_job("w1", kinds=[]) is None


def test_finish_records_state_reason_and_timings(index: Index) -> None:
    job_id = index.enqueue_job("1.1")
    index.claim_job("w1")
    done = index.finish_job(
        job_id,
        "failed",
        reason="no heart found",
        timings=JobTimings(convert_s=0.25, infer_s=None, encode_s=0.5),
        now=9.0,
    )
    assert (done.state, done.reason, done.finished_at) == (JobState.FAILED, "no heart found", 9.0)
    assert done.timings == JobTimings(convert_s=0.25, infer_s=None, encode_s=0.5)
    assert index.job(job_id) == done


def test_finish_refuses_bad_transitions(index: Index) -> None:
    job_id = index.enqueue_job("1.1")
    with pytest.raises(ValueError):
        index.finish_job(job_id, JobState.RUNNING)
    with pytest.raises(RecordNotFoundError):
        index.finish_job(999, JobState.DONE)
    skipped = index.finish_job(job_id, JobState.SKIPPED, reason="gated SPECT")  # queued -> skipped
    assert skipped.state is JobState.SKIPPED
    with pytest.raises(JobStateError):
        index.finish_job(job_id, JobState.DONE)
    job = index.job(job_id)
    assert job is not None and job.state is JobState.SKIPPED


def test_requeue_job_delays_the_next_claim(index: Index) -> None:
    job_id = index.enqueue_job("1.1")
    index.claim_job("w1", now=100.0)
    requeued = index.requeue_job(job_id, "GPU busy", delay_s=30.0, now=100.0)
    assert (requeued.state, requeued.not_before, requeued.attempts) == (JobState.QUEUED, 130.0, 1)
    assert index.claim_job("w1", now=129.0) is None
    again = index.claim_job("w1", now=130.0)
    assert again is not None and again.id == job_id and again.attempts == 2
    index.finish_job(job_id, JobState.DONE)
    with pytest.raises(JobStateError):
        index.requeue_job(job_id, "too late")


def test_stale_running_jobs_are_requeued_with_attempts_kept(index: Index) -> None:
    running = index.enqueue_job("1.1")
    queued_later = index.enqueue_job("1.2")
    index.claim_job("w1")
    recovered = index.requeue_stale_running_jobs()
    assert [(job.id, job.state, job.attempts, job.claimed_by) for job in recovered] == [
        (running, JobState.QUEUED, 1, None)
    ]
    job = index.claim_job("w2")
    assert job is not None and job.id == running and job.attempts == 2  # still first in line
    assert index.job(queued_later) is not None


def test_stale_jobs_over_max_attempts_fail(index: Index) -> None:
    job_id = index.enqueue_job("1.1")
    for _ in range(3):
        index.claim_job("w1")
        index.requeue_stale_running_jobs(max_attempts=3, now=50.0)
    job = index.job(job_id)
    assert job is not None
    assert (job.state, job.attempts, job.finished_at) == (JobState.FAILED, 3, 50.0)
    assert "3 times" in (job.reason or "")


def test_a_job_that_keeps_killing_the_node_fails_at_start_up(tmp_path: Path) -> None:
    """What the node does at each start (``recover`` with ``job_max_attempts``): the job that was
    running through three crashes is failed, and the one queued behind it is next."""
    path = tmp_path / "index.sqlite3"
    with Index.open(path) as first:
        poison, behind = first.enqueue_job("1.1"), first.enqueue_job("1.2")
    for _ in range(3):  # start, claim the oldest job, crash while it runs
        with Index.open(path, recover=True, job_max_attempts=3) as node:
            claimed = node.claim_job("w1")
            assert claimed is not None and claimed.id == poison
    with Index.open(path, recover=True, job_max_attempts=3) as node:
        failed = node.job(poison)
        assert failed is not None and failed.state is JobState.FAILED and "interrupted 3 times" in (failed.reason or "")
        nxt = node.claim_job("w1")
        assert nxt is not None and nxt.id == behind


def test_jobs_lists_newest_first(index: Index) -> None:
    ids = [index.enqueue_job(f"1.{n}") for n in range(5)]
    index.claim_job("w1")
    assert [job.id for job in index.jobs(limit=3)] == ids[::-1][:3]
    assert [job.id for job in index.jobs(state=JobState.RUNNING)] == [ids[0]]
    assert [job.id for job in index.jobs(state="queued")] == ids[:0:-1]


def test_instances_arriving_while_the_job_runs_get_the_series_a_new_job(
    index: Index, make_record: Callable[..., InstanceRecord]
) -> None:
    index.add_instance(make_record("1.1", received_at=10.0))
    first = index.mark_series_complete("1.2.3.1", SEGMENT_JOB, now=20.0)
    job = index.claim_job("w1", now=30.0)
    assert job is not None and job.id == first
    index.add_instance(make_record("1.2", received_at=40.0))  # the job has already read the series
    assert index.mark_series_complete("1.2.3.1", SEGMENT_JOB, now=50.0) == first  # still running: no new job
    index.finish_job(first, JobState.DONE, now=60.0)
    follow_up = index.claim_job("w1", now=70.0)
    assert follow_up is not None and follow_up.id != first and follow_up.series_instance_uid == "1.2.3.1"

    index.add_instance(make_record("1.1", received_at=80.0))  # a re-send of a known instance changes nothing
    index.finish_job(follow_up.id, JobState.DONE, now=90.0)
    assert index.claim_job("w1", now=100.0) is None
