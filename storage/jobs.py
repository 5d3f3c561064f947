"""The job queue part of the index: enqueue, atomic claim, finish, crash recovery.

A job is a row of the ``jobs`` table. A worker claims the oldest queued job
with one ``UPDATE ... WHERE id = (SELECT ...) RETURNING *`` inside
``BEGIN IMMEDIATE``, so two workers can never claim the same job. A partial
unique index allows at most one active (queued or running) job of a kind per
series, which makes :meth:`JobQueueMixin.enqueue_job` idempotent.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence

from storage.database import Database
from storage.errors import JobStateError, RecordNotFoundError
from storage.records import Job, JobState, JobTimings

logger = logging.getLogger(__name__)

SEGMENT_JOB = "segment"
_TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.SKIPPED})


def enqueue(conn: sqlite3.Connection, series_uid: str, kind: str, now: float) -> int:
    """Insert a queued job unless the series already has an active one; return its id.

    Must run inside a write transaction.
    """
    row = conn.execute(
        "SELECT id FROM jobs WHERE series_instance_uid = ? AND kind = ? AND state IN ('queued', 'running')",
        (series_uid, kind),
    ).fetchone()
    if row is not None:
        return int(row["id"])
    row = conn.execute(
        "INSERT INTO jobs (series_instance_uid, kind, state, created_at) VALUES (?, ?, 'queued', ?) RETURNING id",
        (series_uid, kind, now),
    ).fetchone()
    logger.info("job %d (%s) queued for series %s", row["id"], kind, series_uid)
    return int(row["id"])


def finish(
    conn: sqlite3.Connection,
    job_id: int,
    state: JobState,
    reason: str | None,
    timings: JobTimings | None,
    now: float,
) -> Job:
    """Move a queued or running job to a terminal state. Must run inside a write transaction.

    A series completed again while its job ran (new instances) gets a new queued job.
    """
    state = JobState(state)
    if state not in _TERMINAL_STATES:
        raise ValueError(f"a job can only be finished as done, failed or skipped, not {state}")
    timings = timings or JobTimings()
    rows = conn.execute(
        "UPDATE jobs SET state = ?, reason = ?, finished_at = ?,"
        " convert_s = COALESCE(?, convert_s), infer_s = COALESCE(?, infer_s),"
        " encode_s = COALESCE(?, encode_s), not_before = NULL"
        " WHERE id = ? AND state IN ('queued', 'running') RETURNING *",
        (state.value, reason, now, timings.convert_s, timings.infer_s, timings.encode_s, job_id),
    ).fetchall()
    if not rows:
        _raise_missing_or_wrong_state(conn, job_id, f"finish it as {state}")
    job = Job.from_row(rows[0])
    logger.info("job %d finished: %s%s", job_id, state, f" ({reason})" if reason else "")
    series = conn.execute(
        "SELECT state, completed_at FROM series WHERE series_instance_uid = ?", (job.series_instance_uid,)
    ).fetchone()
    if job.started_at is not None and series is not None and series["state"] == "complete":
        if series["completed_at"] is not None and series["completed_at"] > job.started_at:
            # new instances re-opened the series while the job ran and it completed again (enqueue found this
            # job active then): what the job read is out of date, so the series gets a job of its own
            follow_up = enqueue(conn, job.series_instance_uid, job.kind, now)
            logger.info("series %s changed while job %d ran: job %d", job.series_instance_uid, job_id, follow_up)
    return job


def _raise_missing_or_wrong_state(conn: sqlite3.Connection, job_id: int, action: str) -> None:
    current = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if current is None:
        raise RecordNotFoundError(f"no job {job_id}")
    raise JobStateError(f"job {job_id} is {current['state']}: cannot {action}")


class JobQueueMixin:
    """Job-queue methods of :class:`storage.index.Index` (needs ``self._db``)."""

    _db: Database

    def enqueue_job(self, series_uid: str, kind: str = SEGMENT_JOB, now: float | None = None) -> int:
        """Queue a job for a series, or return the id of its active job of that kind.

        Parameters
        ----------
        series_uid : str
            Series Instance UID the job works on.
        kind : str
            What to do with it (``"segment"``).
        now : float or None
            POSIX time of creation; defaults to the current time.

        Returns
        -------
        int
            Id of the new or already active (queued or running) job.
        """
        with self._db.write() as conn:
            return enqueue(conn, series_uid, kind, _now(now))

    def claim_job(self, worker_id: str, kinds: Sequence[str] | None = None, now: float | None = None) -> Job | None:
        """Atomically take the oldest queued job that is due; None if there is none.

        The job becomes ``running``, with ``claimed_by = worker_id``,
        ``started_at = now`` and ``attempts`` incremented.

        Parameters
        ----------
        worker_id : str
            Name of the claiming worker (stored for diagnostics).
        kinds : sequence of str or None
            Only claim jobs of these kinds (all kinds if None).
        now : float or None
            POSIX time of the claim; defaults to the current time.
        """
        now = _now(now)
        kind_filter = ""
        kind_params: tuple[str, ...] = ()
        if kinds is not None:
            if not kinds:
                return None
            kind_filter = f" AND kind IN ({', '.join('?' * len(kinds))})"
            kind_params = tuple(kinds)
        due = f"SELECT id FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= ?){kind_filter}"
        # Cheap read first, so that idle polling never takes the write lock the SCP needs.
        with self._db.read() as conn:
            if conn.execute(f"{due} LIMIT 1", (now, *kind_params)).fetchone() is None:
                return None
        sql = (
            "UPDATE jobs SET state = 'running', claimed_by = ?, started_at = ?,"
            f" finished_at = NULL, attempts = attempts + 1 WHERE id = ({due} ORDER BY id LIMIT 1)"
            " RETURNING *"
        )
        with self._db.write() as conn:
            rows = conn.execute(sql, (worker_id, now, now, *kind_params)).fetchall()
        if not rows:
            return None
        job = Job.from_row(rows[0])
        logger.info("job %d claimed by %s (attempt %d)", job.id, worker_id, job.attempts)
        return job

    def finish_job(
        self,
        job_id: int,
        state: JobState | str,
        reason: str | None = None,
        timings: JobTimings | None = None,
        now: float | None = None,
    ) -> Job:
        """Record the end of a job.

        Parameters
        ----------
        job_id : int
            The job, queued or running.
        state : JobState or str
            ``done``, ``failed`` or ``skipped``.
        reason : str or None
            Why it failed or was skipped (or a note for ``done``).
        timings : JobTimings or None
            Seconds per stage; None fields keep their stored value.
        now : float or None
            POSIX time of the end; defaults to the current time.

        Raises
        ------
        ValueError
            If ``state`` is not a terminal state.
        RecordNotFoundError
            If there is no such job.
        JobStateError
            If the job has already finished.
        """
        with self._db.write() as conn:
            return finish(conn, job_id, JobState(state), reason, timings, _now(now))

    def requeue_job(self, job_id: int, reason: str, delay_s: float = 0.0, now: float | None = None) -> Job:
        """Put a running job back in the queue after a transient failure.

        The job will not be claimed before ``now + delay_s``; its attempts are kept.

        Raises
        ------
        RecordNotFoundError
            If there is no such job.
        JobStateError
            If the job is not running.
        """
        now = _now(now)
        with self._db.write() as conn:
            rows = conn.execute(
                "UPDATE jobs SET state = 'queued', reason = ?, not_before = ?, claimed_by = NULL"
                " WHERE id = ? AND state = 'running' RETURNING *",
                (reason, now + delay_s, job_id),
            ).fetchall()
            if not rows:
                _raise_missing_or_wrong_state(conn, job_id, "requeue it")
        logger.info("job %d requeued in %.1f s: %s", job_id, delay_s, reason)
        return Job.from_row(rows[0])

    def requeue_stale_running_jobs(self, max_attempts: int | None = None, now: float | None = None) -> list[Job]:
        """After a crash, put the jobs left ``running`` back in the queue.

        Call once at start-up, before any worker runs. Attempts are kept, so a
        job that keeps killing the node can be failed with ``max_attempts``.

        Parameters
        ----------
        max_attempts : int or None
            Jobs that already had this many attempts are marked ``failed``
            instead of requeued; None requeues them all.
        now : float or None
            POSIX time used for ``finished_at`` of the failed ones.

        Returns
        -------
        list of Job
            The jobs after the change (queued or failed), by id.
        """
        now = _now(now)
        with self._db.write() as conn:
            failed: list[sqlite3.Row] = []
            if max_attempts is not None:
                failed = conn.execute(
                    "UPDATE jobs SET state = 'failed', finished_at = ?,"
                    " reason = 'interrupted ' || attempts || ' times; not retried'"
                    " WHERE state = 'running' AND attempts >= ? RETURNING *",
                    (now, max_attempts),
                ).fetchall()
            requeued = conn.execute(
                "UPDATE jobs SET state = 'queued', claimed_by = NULL, not_before = NULL,"
                " reason = 'requeued after an interrupted run'"
                " WHERE state = 'running' RETURNING *"
            ).fetchall()
        jobs = sorted((Job.from_row(row) for row in (*failed, *requeued)), key=lambda job: job.id)
        for job in jobs:
            logger.warning("job %d found running at start-up: now %s", job.id, job.state)
        return jobs

    def job(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        with self._db.read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row is not None else None

    def jobs(self, limit: int = 50, state: JobState | str | None = None) -> list[Job]:
        """The most recent jobs first, optionally only those in one state."""
        with self._db.read() as conn:
            if state is None:
                rows = conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = conn.execute(
                    "SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?",
                    (JobState(state).value, limit),
                )
            return [Job.from_row(row) for row in rows.fetchall()]

    def jobs_for_series(self, series_uid: str) -> list[Job]:
        """All jobs of a series, oldest first."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE series_instance_uid = ? ORDER BY id", (series_uid,)
            ).fetchall()
        return [Job.from_row(row) for row in rows]


def _now(now: float | None) -> float:
    return time.time() if now is None else now
