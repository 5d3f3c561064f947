"""Results and their deliveries to peers, with retry scheduling.

A result is a SEG made by a job. Each result is sent to every configured peer;
one ``deliveries`` row per (result, peer) tracks that send until the peer
acknowledges it, with exponential backoff between attempts.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections.abc import Sequence

from storage.database import Database
from storage.errors import JobStateError, RecordNotFoundError
from storage.jobs import finish
from storage.records import (
    DeliveryRecord,
    DeliveryState,
    JobState,
    JobTimings,
    NewResult,
    ResultRecord,
)

logger = logging.getLogger(__name__)

_RESULT_COLUMNS = tuple(field.name for field in dataclasses.fields(NewResult))
_INSERT_RESULT = (
    f"INSERT INTO results ({', '.join(_RESULT_COLUMNS)}, created_at)"
    f" VALUES ({', '.join('?' * len(_RESULT_COLUMNS))}, ?)"
    " ON CONFLICT (seg_sop_instance_uid) DO NOTHING"
)


def next_backoff(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before the next attempt after ``attempts`` failed ones.

    ``base_s * 2 ** (attempts - 1)``, capped at ``max_s``: 1 failure -> base_s,
    2 -> 2 base_s, 3 -> 4 base_s, ...

    Raises
    ------
    ValueError
        If ``attempts < 1`` or a duration is negative.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if base_s < 0 or max_s < 0:
        raise ValueError("backoff durations must be >= 0")
    if attempts > 64:  # 2**63 exceeds any sensible max_s; avoid huge floats
        return max_s
    return min(max_s, base_s * 2.0 ** (attempts - 1))


def _insert_result(conn: sqlite3.Connection, result: NewResult, now: float) -> ResultRecord:
    values = tuple(getattr(result, name) for name in _RESULT_COLUMNS)
    conn.execute(_INSERT_RESULT, (*values, now))
    row = conn.execute(
        "SELECT * FROM results WHERE seg_sop_instance_uid = ?", (result.seg_sop_instance_uid,)
    ).fetchone()
    return ResultRecord.from_row(row)


def _insert_delivery(conn: sqlite3.Connection, result_id: int, peer_ae_title: str, now: float) -> DeliveryRecord:
    conn.execute(
        "INSERT INTO deliveries (result_id, peer_ae_title, state, next_attempt_at, created_at,"
        " updated_at) VALUES (?, ?, 'pending', ?, ?, ?)"
        " ON CONFLICT (result_id, peer_ae_title) DO NOTHING",
        (result_id, peer_ae_title, now, now, now),
    )
    row = conn.execute(
        "SELECT * FROM deliveries WHERE result_id = ? AND peer_ae_title = ?",
        (result_id, peer_ae_title),
    ).fetchone()
    return DeliveryRecord.from_row(row)


class ResultsMixin:
    """Result and delivery methods of :class:`storage.index.Index` (needs ``self._db``)."""

    _db: Database

    def add_result(self, result: NewResult, now: float | None = None) -> ResultRecord:
        """Record a result; adding the same SEG SOP Instance UID again returns the first record."""
        with self._db.write() as conn:
            return _insert_result(conn, result, _now(now))

    def finish_job_with_result(
        self,
        result: NewResult,
        peer_ae_titles: Sequence[str],
        timings: JobTimings | None = None,
        now: float | None = None,
    ) -> tuple[ResultRecord, list[DeliveryRecord]]:
        """In one transaction: record the result, a pending delivery per peer, and the job as done.

        A crash can therefore never leave a finished job without its
        deliveries, nor deliveries of a job that will run again.

        Raises
        ------
        ValueError
            If ``result.job_id`` is None.
        RecordNotFoundError, JobStateError
            If the job does not exist or has already finished (nothing is recorded).
        """
        if result.job_id is None:
            raise ValueError("finish_job_with_result needs a result with a job_id")
        now = _now(now)
        with self._db.write() as conn:
            finish(conn, result.job_id, JobState.DONE, None, timings, now)
            record = _insert_result(conn, result, now)
            deliveries = [_insert_delivery(conn, record.id, peer, now) for peer in peer_ae_titles]
        return record, deliveries

    def result(self, result_id: int) -> ResultRecord | None:
        """The result with this id, or None."""
        with self._db.read() as conn:
            row = conn.execute("SELECT * FROM results WHERE id = ?", (result_id,)).fetchone()
        return ResultRecord.from_row(row) if row is not None else None

    def result_for_job(self, job_id: int) -> ResultRecord | None:
        """The latest result of a job, or None (lets a re-run job reuse what it made)."""
        with self._db.read() as conn:
            row = conn.execute("SELECT * FROM results WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,)).fetchone()
        return ResultRecord.from_row(row) if row is not None else None

    def results(self, study_uid: str | None = None) -> list[ResultRecord]:
        """All results, or those of one study, oldest first."""
        with self._db.read() as conn:
            if study_uid is None:
                rows = conn.execute("SELECT * FROM results ORDER BY id").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM results WHERE study_instance_uid = ? ORDER BY id", (study_uid,)
                ).fetchall()
        return [ResultRecord.from_row(row) for row in rows]

    def add_delivery(self, result_id: int, peer_ae_title: str, now: float | None = None) -> DeliveryRecord:
        """Schedule sending a result to a peer now; idempotent per (result, peer).

        Raises
        ------
        StorageError
            If the result does not exist (foreign key).
        """
        with self._db.write() as conn:
            return _insert_delivery(conn, result_id, peer_ae_title, _now(now))

    def delivery(self, delivery_id: int) -> DeliveryRecord | None:
        """The delivery with this id, or None."""
        with self._db.read() as conn:
            row = conn.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        return DeliveryRecord.from_row(row) if row is not None else None

    def deliveries(
        self, result_id: int | None = None, state: DeliveryState | str | None = None
    ) -> list[DeliveryRecord]:
        """Deliveries, optionally of one result and/or in one state, oldest first."""
        clauses: list[str] = []
        params: list[object] = []
        if result_id is not None:
            clauses.append("result_id = ?")
            params.append(result_id)
        if state is not None:
            clauses.append("state = ?")
            params.append(DeliveryState(state).value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._db.read() as conn:
            rows = conn.execute(f"SELECT * FROM deliveries{where} ORDER BY id", params).fetchall()
        return [DeliveryRecord.from_row(row) for row in rows]

    def due_deliveries(self, now: float | None = None, limit: int = 100) -> list[DeliveryRecord]:
        """Pending deliveries whose next attempt is due, earliest first (read only)."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, id LIMIT ?",
                (_now(now), limit),
            ).fetchall()
        return [DeliveryRecord.from_row(row) for row in rows]

    def claim_due_deliveries(self, now: float | None = None, limit: int = 100) -> list[DeliveryRecord]:
        """Atomically move due pending deliveries to ``sending`` and return them."""
        now = _now(now)
        with self._db.write() as conn:
            rows = conn.execute(
                "UPDATE deliveries SET state = 'sending', updated_at = ?"
                " WHERE id IN (SELECT id FROM deliveries WHERE state = 'pending'"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?) RETURNING *",
                (now, now, limit),
            ).fetchall()
        return sorted((DeliveryRecord.from_row(row) for row in rows), key=lambda d: d.id)

    def reset_deliveries(
        self, result_id: int | None = None, states: Sequence[str] = ("failed",), now: float | None = None
    ) -> list[DeliveryRecord]:
        """Make deliveries due again (``spect-node resend``): state pending, attempts 0, due now.

        Parameters
        ----------
        result_id
            Only this result's deliveries; ``None`` = all results.
        states
            Which states to reset (default: the failed ones; add ``done`` to send again).
        """
        now = _now(now)
        placeholders = ", ".join("?" for _ in states)
        sql = (
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, created_at = ?,"
            f" updated_at = ?, last_error = NULL WHERE state IN ({placeholders})"
        )
        params: list[object] = [now, now, now, *[str(s) for s in states]]
        if result_id is not None:
            sql += " AND result_id = ?"
            params.append(result_id)
        with self._db.write() as conn:
            rows = conn.execute(sql + " RETURNING *", params).fetchall()
        return sorted((DeliveryRecord.from_row(row) for row in rows), key=lambda d: d.id)

    def mark_delivery(
        self,
        delivery_id: int,
        *,
        success: bool,
        error: str | None = None,
        base_s: float = 2.0,
        max_s: float = 300.0,
        max_attempts: int | None = None,
        retry_window_s: float | None = None,
        now: float | None = None,
    ) -> DeliveryRecord:
        """Record the outcome of one attempt to send a result to a peer.

        On success the delivery is ``done``. On failure ``attempts`` grows by
        one and the delivery is ``pending`` again at ``now + next_backoff(...)``,
        unless ``max_attempts`` attempts were made or ``retry_window_s`` has
        passed since it was created: then it is ``failed`` for good.

        Raises
        ------
        RecordNotFoundError
            If there is no such delivery.
        JobStateError
            If the delivery is already done or failed.
        """
        now = _now(now)
        with self._db.write() as conn:
            row = conn.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            if row is None:
                raise RecordNotFoundError(f"no delivery {delivery_id}")
            current = DeliveryRecord.from_row(row)
            if current.state not in (DeliveryState.PENDING, DeliveryState.SENDING):
                raise JobStateError(f"delivery {delivery_id} is already {current.state}")
            attempts = current.attempts + 1
            next_attempt_at = current.next_attempt_at
            if success:
                state, error = DeliveryState.DONE, None
            elif (max_attempts is not None and attempts >= max_attempts) or (
                retry_window_s is not None and now - current.created_at >= retry_window_s
            ):
                state = DeliveryState.FAILED
            else:
                state = DeliveryState.PENDING
                next_attempt_at = now + next_backoff(attempts, base_s, max_s)
            row = conn.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?,"
                " last_error = ?, updated_at = ? WHERE id = ? RETURNING *",
                (state.value, attempts, next_attempt_at, error, now, delivery_id),
            ).fetchall()[0]
        record = DeliveryRecord.from_row(row)
        log = logger.info if state is not DeliveryState.FAILED else logger.error
        log(
            "delivery %d of result %d to %s: %s after %d attempt(s)%s",
            delivery_id,
            record.result_id,
            record.peer_ae_title,
            state,
            attempts,
            f" ({error})" if error else "",
        )
        return record

    def requeue_stale_deliveries(self, now: float | None = None) -> list[DeliveryRecord]:
        """After a crash, make the deliveries left ``sending`` pending and due now."""
        now = _now(now)
        with self._db.write() as conn:
            rows = conn.execute(
                "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, updated_at = ?"
                " WHERE state = 'sending' RETURNING *",
                (now, now),
            ).fetchall()
        records = sorted((DeliveryRecord.from_row(row) for row in rows), key=lambda d: d.id)
        for record in records:
            logger.warning("delivery %d found sending at start-up: pending again", record.id)
        return records


def _now(now: float | None) -> float:
    return time.time() if now is None else now
