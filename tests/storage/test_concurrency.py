"""Concurrency of the index: many writer threads and several job claimers at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from storage import Index, InstanceRecord, JobState

N_WRITERS = 4
INSTANCES_PER_WRITER = 40
N_SERIES = 8
N_CLAIMERS = 3


def test_concurrent_writers_and_claimers(tmp_path: Path, make_record: Callable[..., InstanceRecord]) -> None:
    index = Index.open(tmp_path / "index.sqlite3", busy_timeout_s=30.0)
    errors: list[BaseException] = []
    claimed: list[int] = []
    claimed_lock = threading.Lock()
    writers_done = threading.Event()
    enqueuer_done = threading.Event()
    start = threading.Barrier(N_WRITERS + 1 + N_CLAIMERS)

    def guarded(work):  # noqa: ANN001, ANN202 - wraps a thread body
        def run() -> None:
            try:
                start.wait()
                work()
            except BaseException as exc:  # noqa: BLE001 - collected and asserted empty
                errors.append(exc)

        return run

    def write(writer: int) -> None:
        for n in range(INSTANCES_PER_WRITER):
            series = f"1.2.{n % N_SERIES}"
            index.add_instance(
                make_record(f"1.3.{writer}.{n}", series_uid=series, instance_number=n, received_at=float(n))
            )

    def enqueue() -> None:
        while not writers_done.is_set():
            for s in range(N_SERIES):
                if index.series(f"1.2.{s}") is not None:
                    index.mark_series_complete(f"1.2.{s}", job_kind="segment")
        for s in range(N_SERIES):
            index.mark_series_complete(f"1.2.{s}", job_kind="segment")

    def claim(worker: int) -> None:
        while True:
            no_more_jobs = enqueuer_done.is_set()  # read before claiming: no race
            job = index.claim_job(f"worker-{worker}")
            if job is None:
                if no_more_jobs:
                    return
                continue
            with claimed_lock:
                claimed.append(job.id)
            index.finish_job(job.id, JobState.DONE)

    writers = [threading.Thread(target=guarded(lambda w=w: write(w))) for w in range(N_WRITERS)]
    enqueuer = threading.Thread(target=guarded(enqueue))
    claimers = [threading.Thread(target=guarded(lambda c=c: claim(c))) for c in range(N_CLAIMERS)]
    for thread in (*writers, enqueuer, *claimers):
        thread.start()
    for thread in writers:
        thread.join(timeout=60)
    writers_done.set()
    enqueuer.join(timeout=60)
    enqueuer_done.set()
    for thread in claimers:
        thread.join(timeout=60)

    try:
        assert errors == []  # in particular no "database is locked"
        assert len(claimed) == len(set(claimed))  # no job claimed twice
        all_jobs = index.jobs(limit=100_000)
        assert sorted(claimed) == sorted(job.id for job in all_jobs)
        assert all(job.state is JobState.DONE and job.attempts == 1 for job in all_jobs)
        total = 0
        for s in range(N_SERIES):
            series = index.series(f"1.2.{s}")
            assert series is not None
            rows = index.instances_for_series(f"1.2.{s}")
            assert series.n_instances == len(rows)
            total += len(rows)
        assert total == N_WRITERS * INSTANCES_PER_WRITER
    finally:
        index.close()
