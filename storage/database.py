"""SQLite connections for the index: one per thread, WAL, explicit transactions.

The DICOM SCP writes from one thread per association while a worker thread
claims jobs, so each thread gets its own connection (SQLite connections are
not meant to be shared). Connections of threads that have ended are closed
the next time a thread opens one, so short-lived association threads do not
leak connections.

Writes run in ``BEGIN IMMEDIATE`` transactions: the write lock is taken up
front and waits up to the busy timeout, instead of failing half-way with
"database is locked" when a read transaction tries to upgrade.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import StorageError, StorageFullError

logger = logging.getLogger(__name__)

_SQLITE_FULL = 13  # primary result code of "database or disk is full"


class Database:
    """Per-thread connections to one SQLite file.

    Parameters
    ----------
    path : path-like
        The database file (created if missing).
    busy_timeout_s : float
        How long a statement waits for another connection's lock.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._by_thread: dict[threading.Thread, sqlite3.Connection] = {}
        self._closed = False

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use.

        Raises
        ------
        StorageError
            If the database has been closed or cannot be opened.
        """
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._lock:
            if self._closed:
                raise StorageError(f"the index {self.path.name} is closed")
            self._close_connections_of_dead_threads()
            conn = self._connect()
            self._by_thread[threading.current_thread()] = conn
        self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close every connection; later calls to :meth:`connection` raise."""
        with self._lock:
            self._closed = True
            connections = list(self._by_thread.values())
            self._by_thread.clear()
        for conn in connections:
            conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction, committed on success and rolled back on error.

        SQLite errors are re-raised as :class:`StorageFullError` (disk full)
        or :class:`StorageError`; other exceptions pass through unchanged.
        """
        with self._transaction("BEGIN IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A deferred (read) transaction: a consistent snapshot for several SELECTs."""
        with self._transaction("BEGIN") as conn:
            yield conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
        if conn.in_transaction:
            raise RuntimeError("nested index transactions are not supported")
        try:
            conn.execute(begin)
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _storage_error(exc) from exc

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,  # autocommit: transactions are explicit
                check_same_thread=False,  # owned by one thread; closed by close() from another
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            # FULL: a commit survives power loss, not only a crash of the process.
            conn.execute("PRAGMA synchronous = FULL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.Error as exc:
            raise _storage_error(exc) from exc
        if str(mode).lower() != "wal":
            logger.warning("index %s runs in journal mode %s, not WAL", self.path.name, mode)
        return conn

    def _close_connections_of_dead_threads(self) -> None:
        """Close the connections of threads that have ended (caller holds the lock)."""
        dead = [thread for thread in self._by_thread if not thread.is_alive()]
        for thread in dead:
            self._by_thread.pop(thread).close()


def _storage_error(exc: sqlite3.Error) -> StorageError:
    """Map a SQLite error onto the storage exceptions."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == _SQLITE_FULL:
        return StorageFullError(f"index database full: {exc}")
    return StorageError(f"index database error: {exc}")
