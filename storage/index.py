"""The SQLite index: what is stored, which series are complete, the job queue, results.

:class:`Index` is the one object the rest of the node talks to. It is safe to
use from many threads at once (one SQLite connection per thread, WAL mode,
``BEGIN IMMEDIATE`` for every write). Instance and series methods live here;
job-queue methods come from :class:`storage.jobs.JobQueueMixin`, result and
delivery methods from :class:`storage.results.ResultsMixin` and query/retrieve
matching from :class:`storage.query.QueryMixin`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import time
from pathlib import Path
from types import TracebackType

from storage.database import Database
from storage.errors import RecordNotFoundError, SchemaVersionError, StorageError
from storage.jobs import JobQueueMixin, enqueue
from storage.query import QueryMixin
from storage.records import InstanceRecord, SeriesRecord
from storage.results import ResultsMixin
from storage.schema import migrate

logger = logging.getLogger(__name__)

_INSTANCE_COLUMNS = tuple(field.name for field in dataclasses.fields(InstanceRecord))
_UPSERT_INSTANCE = (
    f"INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(_INSTANCE_COLUMNS))})"
    " ON CONFLICT (sop_instance_uid) DO UPDATE SET "
    + ", ".join(  # the node's own SEG sent back by a PACS stays the node's result
        f"{name} = MAX(is_result, excluded.is_result)" if name == "is_result" else f"{name} = excluded.{name}"
        for name in _INSTANCE_COLUMNS[1:]
    )
)
_UPSERT_SERIES = (
    "INSERT INTO series (series_instance_uid, study_instance_uid, modality, first_received_at,"
    " last_received_at, n_instances, state, is_result) VALUES (?, ?, ?, ?, ?, 0, 'receiving', ?)"
    " ON CONFLICT (series_instance_uid) DO UPDATE SET"
    " first_received_at = MIN(first_received_at, excluded.first_received_at),"
    " last_received_at = MAX(last_received_at, excluded.last_received_at),"
    " modality = COALESCE(modality, excluded.modality)"
)


class Index(JobQueueMixin, ResultsMixin, QueryMixin):
    """The index database of one storage root.

    Build it with :meth:`open`; close it with :meth:`close` (or use it as a
    context manager).
    """

    def __init__(self, database: Database) -> None:
        self._db = database

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 30.0,
        recover: bool = False,
        job_max_attempts: int | None = None,
    ) -> Index:
        """Open (creating if needed) and migrate the index database.

        Parameters
        ----------
        path : path-like
            The SQLite file; its folder is created if missing.
        busy_timeout_s : float
            How long a write waits for another writer before failing.
        recover : bool
            Also requeue jobs left ``running`` and deliveries left ``sending``
            by a previous process. Only the process that runs the workers
            should pass True, once, at start-up.
        job_max_attempts : int or None
            With ``recover``: a job left ``running`` that already ran this many
            times is failed instead of requeued (a job that kills the process
            must not block the queue forever); None requeues every one.

        Raises
        ------
        SchemaVersionError
            If the database was written by a newer version of the code.
        StorageError
            If the file cannot be opened or migrated.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder of {path}: {exc}") from exc
        database = Database(path, busy_timeout_s=busy_timeout_s)
        try:
            try:
                migrate(database.connection())
            except SchemaVersionError as exc:
                raise SchemaVersionError(f"{path}: {exc}") from exc
            except (sqlite3.Error, StorageError) as exc:  # not a database, unreadable, a failed migration
                raise StorageError(f"{path}: cannot open the index: {exc}") from exc
            index = cls(database)
            if recover:
                index.requeue_stale_running_jobs(max_attempts=job_max_attempts)
                index.requeue_stale_deliveries()
        except BaseException:
            database.close()
            raise
        return index

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._db.path

    def close(self) -> None:
        """Close every connection of every thread."""
        self._db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add_instance(self, record: InstanceRecord) -> bool:
        """Index a stored instance (insert or update) and update its series.

        Re-sending an instance updates its row instead of adding one. A new
        instance in a series already marked complete re-opens the series
        (state ``receiving``) so that it is assembled again; so does a re-sent
        one when the series' last job failed (a re-send retries it).

        Returns
        -------
        bool
            True if the SOP Instance UID was not indexed before.
        """
        values = tuple(getattr(record, name) for name in _INSTANCE_COLUMNS)
        series_uid = record.series_instance_uid
        with self._db.write() as conn:
            old = conn.execute(
                "SELECT series_instance_uid FROM instances WHERE sop_instance_uid = ?",
                (record.sop_instance_uid,),
            ).fetchone()
            conn.execute(_UPSERT_INSTANCE, values)
            conn.execute(
                _UPSERT_SERIES,
                (
                    series_uid,
                    record.study_instance_uid,
                    record.modality,
                    record.received_at,
                    record.received_at,
                    int(record.is_result),
                ),
            )
            last_job = conn.execute(
                "SELECT state FROM jobs WHERE series_instance_uid = ? ORDER BY id DESC LIMIT 1", (series_uid,)
            ).fetchone()
            retry = old is not None and last_job is not None and last_job["state"] == "failed"
            if old is None or retry:
                reopened = conn.execute(
                    "UPDATE series SET state = 'receiving', completed_at = NULL"
                    " WHERE series_instance_uid = ? AND state = 'complete'",
                    (series_uid,),
                ).rowcount
                if reopened and retry:
                    logger.info("series %s re-sent after its job failed: it will be processed again", series_uid)
                elif reopened:
                    logger.info("series %s received a new instance after completion", series_uid)
            touched = {series_uid}
            if old is not None and old["series_instance_uid"] != series_uid:
                logger.warning(
                    "instance %s moved from series %s to %s",
                    record.sop_instance_uid,
                    old["series_instance_uid"],
                    series_uid,
                )
                touched.add(old["series_instance_uid"])
            for uid in touched:
                conn.execute(
                    "UPDATE series SET n_instances = (SELECT COUNT(*) FROM instances"
                    " WHERE series_instance_uid = ?1) WHERE series_instance_uid = ?1",
                    (uid,),
                )
        return old is None

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        """The instance with this SOP Instance UID, or None."""
        with self._db.read() as conn:
            row = conn.execute("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_uid,)).fetchone()
        return InstanceRecord.from_row(row) if row is not None else None

    def instances_for_series(self, series_uid: str) -> list[InstanceRecord]:
        """Instances of a series, by Instance Number (missing last) then SOP Instance UID."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM instances WHERE series_instance_uid = ?"
                " ORDER BY instance_number IS NULL, instance_number, sop_instance_uid",
                (series_uid,),
            ).fetchall()
        return [InstanceRecord.from_row(row) for row in rows]

    def series(self, series_uid: str) -> SeriesRecord | None:
        """The series with this Series Instance UID, or None."""
        with self._db.read() as conn:
            row = conn.execute("SELECT * FROM series WHERE series_instance_uid = ?", (series_uid,)).fetchone()
        return SeriesRecord.from_row(row) if row is not None else None

    def set_expected_instances(self, series_uid: str, expected: int | None) -> None:
        """Record how many instances a series should hold (None: unknown).

        Raises
        ------
        RecordNotFoundError
            If the series is not indexed.
        """
        with self._db.write() as conn:
            changed = conn.execute(
                "UPDATE series SET expected_instances = ? WHERE series_instance_uid = ?",
                (expected, series_uid),
            ).rowcount
        if not changed:
            raise RecordNotFoundError(f"no series {series_uid}")

    def mark_series_complete(
        self,
        series_uid: str,
        job_kind: str | None = None,
        now: float | None = None,
        idle_since: float | None = None,
    ) -> int | None:
        """Mark a series complete and, in the same transaction, queue a job for it.

        Doing both at once means a crash cannot leave a complete series
        without its job. Marking an already complete series again changes
        nothing: it returns the job queued when the series completed, whatever
        its state now (two associations completing a series at once make one
        job), and queues one only if that completion had none.

        Parameters
        ----------
        series_uid : str
            The series.
        job_kind : str or None
            Kind of job to queue (e.g. ``"segment"``); None queues nothing.
        now : float or None
            POSIX time of completion; defaults to the current time.
        idle_since : float or None
            Complete the series only if its last instance arrived at or before this time
            (re-checked in the transaction: an idle sweep does not close a series an
            instance has just reached).

        Returns
        -------
        int or None
            Id of the queued (or already existing) job; None if ``job_kind`` is None, or
            for an idle sweep (``idle_since``) if the series received an instance since or
            was completed meanwhile.

        Raises
        ------
        RecordNotFoundError
            If the series is not indexed.
        """
        now = time.time() if now is None else now
        with self._db.write() as conn:
            exists = conn.execute(
                "SELECT state, last_received_at, completed_at FROM series WHERE series_instance_uid = ?",
                (series_uid,),
            ).fetchone()
            if exists is None:
                raise RecordNotFoundError(f"no series {series_uid}")
            if idle_since is not None:  # an idle sweep: the series must still be as the sweep saw it
                if exists["state"] != "receiving":
                    logger.debug("series %s was completed since the sweep looked at it", series_uid)
                    return None  # its job is queued or done already: a second one would make a second SEG
                if exists["last_received_at"] > idle_since:
                    logger.info("series %s received an instance since it went idle: not complete yet", series_uid)
                    return None
            completed = conn.execute(
                "UPDATE series SET state = 'complete', completed_at = ?"
                " WHERE series_instance_uid = ? AND state = 'receiving'",
                (now, series_uid),
            ).rowcount
            if job_kind is None:
                return None
            if not completed:  # already complete: the job of that completion, however it has ended
                since = conn.execute(
                    "SELECT id FROM jobs WHERE series_instance_uid = ? AND kind = ? AND created_at >= ?"
                    " ORDER BY id DESC LIMIT 1",
                    (series_uid, job_kind, exists["completed_at"]),
                ).fetchone()
                if since is not None:  # two stores completing the series at once: one job, one SEG
                    return int(since["id"])
            job_id = enqueue(conn, series_uid, job_kind, now)
        logger.info("series %s complete", series_uid)
        return job_id

    def series_idle_since(self, cutoff: float, include_results: bool = False) -> list[SeriesRecord]:
        """Series still receiving whose last instance arrived at or before ``cutoff``.

        Parameters
        ----------
        cutoff : float
            POSIX time, typically ``now - series_idle_timeout``.
        include_results : bool
            Also return series made by the node itself (its SEGs).

        Returns
        -------
        list of SeriesRecord
            Oldest activity first.
        """
        sql = "SELECT * FROM series WHERE state = 'receiving' AND last_received_at <= ?"
        if not include_results:
            sql += " AND is_result = 0"
        with self._db.read() as conn:
            rows = conn.execute(sql + " ORDER BY last_received_at", (cutoff,)).fetchall()
        return [SeriesRecord.from_row(row) for row in rows]
