"""The index schema and its ordered migrations.

The ``schema_version`` table holds one row per applied migration. On open,
:func:`migrate` applies the pending migrations in order inside one
``BEGIN IMMEDIATE`` transaction (concurrent openers serialise on it), and
refuses a database whose version is newer than :data:`LATEST_VERSION`.

To change the schema, append a :class:`Migration` to :data:`MIGRATIONS`;
never edit one that has shipped.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass

from storage.errors import SchemaVersionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: a version number and the statements that reach it."""

    version: int
    description: str
    statements: tuple[str, ...]


_V1_STATEMENTS: tuple[str, ...] = (
    """
    CREATE TABLE instances (
        sop_instance_uid         TEXT PRIMARY KEY,
        sop_class_uid            TEXT NOT NULL,
        series_instance_uid      TEXT NOT NULL,
        study_instance_uid       TEXT NOT NULL,
        patient_id               TEXT,
        patient_name             TEXT,
        patient_birth_date       TEXT,
        patient_sex              TEXT,
        study_date               TEXT,
        study_time               TEXT,
        accession_number         TEXT,
        study_id                 TEXT,
        study_description        TEXT,
        referring_physician_name TEXT,
        modality                 TEXT,
        series_number            INTEGER,
        series_description       TEXT,
        series_date              TEXT,
        instance_number          INTEGER,
        number_of_frames         INTEGER,
        transfer_syntax_uid      TEXT NOT NULL,
        path                     TEXT NOT NULL,
        size_bytes               INTEGER NOT NULL CHECK (size_bytes >= 0),
        received_at              REAL NOT NULL,
        calling_ae_title         TEXT,
        is_result                INTEGER NOT NULL DEFAULT 0 CHECK (is_result IN (0, 1)),
        image_type               TEXT
    )
    """,
    "CREATE INDEX instances_by_series ON instances (series_instance_uid, instance_number)",
    "CREATE INDEX instances_by_study ON instances (study_instance_uid)",
    "CREATE INDEX instances_by_patient ON instances (patient_id)",
    "CREATE INDEX instances_by_study_date ON instances (study_date)",
    "CREATE INDEX instances_by_accession ON instances (accession_number)",
    """
    CREATE TABLE series (
        series_instance_uid TEXT PRIMARY KEY,
        study_instance_uid  TEXT NOT NULL,
        modality            TEXT,
        first_received_at   REAL NOT NULL,
        last_received_at    REAL NOT NULL,
        expected_instances  INTEGER CHECK (expected_instances IS NULL OR expected_instances >= 0),
        n_instances         INTEGER NOT NULL DEFAULT 0,
        state               TEXT NOT NULL DEFAULT 'receiving'
                                CHECK (state IN ('receiving', 'complete')),
        completed_at        REAL,
        is_result           INTEGER NOT NULL DEFAULT 0 CHECK (is_result IN (0, 1))
    )
    """,
    "CREATE INDEX series_by_state ON series (state, last_received_at)",
    """
    CREATE TABLE jobs (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        series_instance_uid TEXT NOT NULL,
        kind                TEXT NOT NULL,
        state               TEXT NOT NULL DEFAULT 'queued'
                                CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped')),
        reason              TEXT,
        attempts            INTEGER NOT NULL DEFAULT 0,
        created_at          REAL NOT NULL,
        started_at          REAL,
        finished_at         REAL,
        claimed_by          TEXT,
        not_before          REAL,
        convert_s           REAL,
        infer_s             REAL,
        encode_s            REAL
    )
    """,
    # At most one active (queued or running) job of a kind per series.
    """
    CREATE UNIQUE INDEX jobs_one_active_per_series ON jobs (series_instance_uid, kind)
        WHERE state IN ('queued', 'running')
    """,
    "CREATE INDEX jobs_by_state ON jobs (state, id)",
    """
    CREATE TABLE results (
        id                         INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id                     INTEGER REFERENCES jobs (id),
        study_instance_uid         TEXT NOT NULL,
        source_series_instance_uid TEXT NOT NULL,
        seg_sop_instance_uid       TEXT NOT NULL UNIQUE,
        seg_series_instance_uid    TEXT NOT NULL,
        path                       TEXT NOT NULL,
        myocardium_volume_ml       REAL,
        model_name                 TEXT NOT NULL,
        model_version              TEXT NOT NULL,
        created_at                 REAL NOT NULL
    )
    """,
    "CREATE INDEX results_by_study ON results (study_instance_uid)",
    "CREATE INDEX results_by_job ON results (job_id)",
    """
    CREATE TABLE deliveries (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        result_id       INTEGER NOT NULL REFERENCES results (id),
        peer_ae_title   TEXT NOT NULL,
        state           TEXT NOT NULL DEFAULT 'pending'
                            CHECK (state IN ('pending', 'sending', 'done', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error      TEXT,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        UNIQUE (result_id, peer_ae_title)
    )
    """,
    "CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at)",
)

# Query/Retrieve: Modality at SERIES level and ModalitiesInStudy at STUDY level.
_V2_STATEMENTS: tuple[str, ...] = (
    "CREATE INDEX instances_by_modality ON instances (modality, study_instance_uid, series_instance_uid)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "instances, series, jobs, results, deliveries", _V1_STATEMENTS),
    Migration(2, "index of instances by modality for query/retrieve", _V2_STATEMENTS),
)
LATEST_VERSION: int = MIGRATIONS[-1].version

_CREATE_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_version (
        version     INTEGER PRIMARY KEY,
        description TEXT NOT NULL,
        applied_at  REAL NOT NULL
    )
"""


def current_version(conn: sqlite3.Connection) -> int:
    """Highest applied migration (0 for an empty database or one without the version table)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row[0] is not None else 0


def migrate(conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring the database up to the last of ``migrations``.

    Parameters
    ----------
    conn : sqlite3.Connection
        An autocommit connection (``isolation_level=None``) not inside a transaction.
    migrations : tuple of Migration
        Ordered steps, versions 1, 2, ... without gaps.

    Returns
    -------
    list of int
        Versions applied by this call (empty if the database was up to date).

    Raises
    ------
    SchemaVersionError
        If the database is newer than the last migration known to this code.
    ValueError
        If ``migrations`` are not numbered 1, 2, ... in order.
    """
    _check_ordered(migrations)
    latest = migrations[-1].version if migrations else 0
    applied: list[int] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CREATE_VERSION_TABLE)
        version = current_version(conn)
        if version > latest:
            raise SchemaVersionError(
                f"the index database is at schema version {version}, newer than the "
                f"{latest} this version of spect-node knows; upgrade spect-node"
            )
        for migration in migrations[version:]:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.description, time.time()),
            )
            applied.append(migration.version)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    if applied:
        logger.info("index schema migrated from version %d to %d", version, latest)
    return applied


def _check_ordered(migrations: tuple[Migration, ...]) -> None:
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(f"migration {migration.version} out of order: expected version {expected}")
