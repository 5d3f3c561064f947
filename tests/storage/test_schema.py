"""Tests of storage.schema: ordered migrations, refusal of newer databases."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from storage import LATEST_VERSION, Index, SchemaVersionError
from storage.schema import MIGRATIONS, Migration, current_version, migrate

EXPECTED_TABLES = {"schema_version", "instances", "series", "jobs", "results", "deliveries"}


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _tables(path: Path) -> set[str]:
    with closing(_connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows} - {"sqlite_sequence"}


def _versions(path: Path) -> list[int]:
    with closing(_connect(path)) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def test_new_database_gets_every_table_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "index.sqlite3"
    Index.open(path).close()
    assert _tables(path) == EXPECTED_TABLES
    assert _versions(path) == list(range(1, LATEST_VERSION + 1))
    conn = _connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_empty_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    path.touch()
    Index.open(path).close()
    assert _tables(path) == EXPECTED_TABLES


def test_version_zero_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    conn = _connect(path)
    conn.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    assert current_version(conn) == 0
    conn.close()
    Index.open(path).close()
    assert _versions(path) == list(range(1, LATEST_VERSION + 1))


def test_reopening_does_not_rerun_migrations(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    Index.open(path).close()
    conn = _connect(path)
    assert migrate(conn) == []
    conn.close()
    Index.open(path).close()
    assert _versions(path) == list(range(1, LATEST_VERSION + 1))


def test_newer_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    Index.open(path).close()
    conn = _connect(path)
    conn.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (LATEST_VERSION + 1,))
    conn.close()
    with pytest.raises(SchemaVersionError, match="newer"):
        Index.open(path)
    assert _versions(path) == [*range(1, LATEST_VERSION + 1), LATEST_VERSION + 1]


def test_pending_migrations_are_applied_in_order(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    Index.open(path).close()
    later = (
        *MIGRATIONS,
        Migration(LATEST_VERSION + 1, "add notes", ("CREATE TABLE notes (text TEXT)",)),
        Migration(LATEST_VERSION + 2, "fill notes", ("INSERT INTO notes VALUES ('hello')",)),
    )
    conn = _connect(path)
    assert migrate(conn, later) == [LATEST_VERSION + 1, LATEST_VERSION + 2]
    assert conn.execute("SELECT text FROM notes").fetchall() == [("hello",)]
    assert current_version(conn) == LATEST_VERSION + 2
    conn.close()


def test_failing_migration_is_rolled_back_entirely(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    broken = (
        *MIGRATIONS,
        Migration(LATEST_VERSION + 1, "half", ("CREATE TABLE half (x)", "THIS IS NOT SQL")),
    )
    conn = _connect(path)
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, broken)
    assert not conn.in_transaction
    conn.close()
    assert _tables(path) <= {"schema_version"}  # even migration 1 was rolled back
    Index.open(path).close()  # the real migrations still apply afterwards
    assert _tables(path) == EXPECTED_TABLES


def test_migrations_must_be_numbered_in_order(tmp_path: Path) -> None:
    conn = _connect(tmp_path / "index.sqlite3")
    with pytest.raises(ValueError, match="out of order"):
        migrate(conn, (Migration(2, "skip one", ("CREATE TABLE t (x)",)),))
    conn.close()
