"""Retention: remove studies received longer ago than a period, their files and index rows together.

A study's age is the time since its most recent instance was received (its SEGs
count: they are stored like received instances). A study old enough is still
*held*, never removed, while the node owes work on it:

- a job of one of its series is queued or running;
- a series is still receiving (the node has not processed it yet);
- a delivery of one of its SEGs is pending or sending (a failed attempt that will
  be retried is pending), and, unless ``include_failed``, one that failed for good
  (the SEG never reached its peer; ``spect-node resend --all-failed`` may still send it).

Crash safety. Each study is removed in one ``BEGIN IMMEDIATE`` transaction that
re-checks its age and holds and deletes all its rows (instances, series, jobs,
results, deliveries); its files are deleted only after that commit. The index
therefore never names a file that is gone (a C-FIND never offers, and a C-GET never
fails on, a half-removed study). A crash between the commit and the file deletion
leaves files no row names; the next purge removes such orphans once they are older
than the period (:func:`remove_orphans`). Only the files named by the removed rows
are deleted and folders are removed only when empty, so an instance of the same
study written by the receiver during the purge (file first, row second) is kept.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from storage.errors import InvalidUIDError
from storage.store import Storage

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0
_MASK_SUFFIX = "_myocardium.nii.gz"


@dataclass(frozen=True, slots=True)
class StudySummary:
    """One stored study as retention sees it."""

    study_instance_uid: str
    patient_id: str | None
    last_received_at: float
    n_instances: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class HeldStudy:
    """A study old enough to go but kept, and why."""

    study: StudySummary
    reason: str


@dataclass
class PurgeReport:
    """What a purge removed (or, in a dry run, would remove) and what it kept."""

    cutoff: float
    dry_run: bool
    removed: list[StudySummary] = field(default_factory=list)
    held: list[HeldStudy] = field(default_factory=list)
    files_removed: int = 0
    orphans_removed: int = 0
    file_errors: list[str] = field(default_factory=list)

    @property
    def instances_removed(self) -> int:
        """Index rows of instances removed."""
        return sum(study.n_instances for study in self.removed)

    @property
    def bytes_removed(self) -> int:
        """Bytes of the removed instances (as recorded at reception)."""
        return sum(study.size_bytes for study in self.removed)


def _summary(row: sqlite3.Row) -> StudySummary:
    return StudySummary(
        study_instance_uid=row["study_instance_uid"],
        patient_id=row["patient_id"],
        last_received_at=float(row["last_received_at"]),
        n_instances=int(row["n_instances"]),
        size_bytes=int(row["size_bytes"] or 0),
    )


_STUDIES = (
    "SELECT study_instance_uid, MAX(patient_id) AS patient_id, MAX(received_at) AS last_received_at,"
    " COUNT(*) AS n_instances, SUM(size_bytes) AS size_bytes FROM instances"
)


def expired_studies(conn: sqlite3.Connection, cutoff: float) -> list[StudySummary]:
    """Studies whose most recent instance was received before ``cutoff`` (POSIX time), oldest first."""
    rows = conn.execute(
        f"{_STUDIES} GROUP BY study_instance_uid HAVING MAX(received_at) < ?"
        " ORDER BY last_received_at, study_instance_uid",
        (cutoff,),
    ).fetchall()
    return [_summary(row) for row in rows]


def _study_series(conn: sqlite3.Connection, study_uid: str) -> list[str]:
    rows = conn.execute(
        "SELECT series_instance_uid FROM series WHERE study_instance_uid = ?1"
        " UNION SELECT series_instance_uid FROM instances WHERE study_instance_uid = ?1",
        (study_uid,),
    ).fetchall()
    return sorted(row[0] for row in rows)


def hold_reason(conn: sqlite3.Connection, study_uid: str, include_failed: bool = False) -> str | None:
    """Why a study must be kept whatever its age (see the module docstring), or None."""
    job = conn.execute(
        "SELECT j.id, j.state, j.series_instance_uid FROM jobs j JOIN series s"
        " ON s.series_instance_uid = j.series_instance_uid"
        " WHERE s.study_instance_uid = ? AND j.state IN ('queued', 'running') ORDER BY j.id LIMIT 1",
        (study_uid,),
    ).fetchone()
    if job is not None:
        return f"job {job['id']} is {job['state']} (series {job['series_instance_uid']})"
    receiving = conn.execute(
        "SELECT series_instance_uid FROM series WHERE study_instance_uid = ? AND state = 'receiving'"
        " AND is_result = 0 LIMIT 1",
        (study_uid,),
    ).fetchone()
    if receiving is not None:
        return f"series {receiving[0]} is still receiving (not processed yet)"
    states = ("pending", "sending") if include_failed else ("pending", "sending", "failed")
    delivery = conn.execute(
        "SELECT d.id, d.state, d.peer_ae_title, d.attempts FROM deliveries d JOIN results r ON r.id = d.result_id"
        f" WHERE r.study_instance_uid = ? AND d.state IN ({', '.join('?' * len(states))}) ORDER BY d.id LIMIT 1",
        (study_uid, *states),
    ).fetchone()
    if delivery is not None:
        what = "failed for good" if delivery["state"] == "failed" else delivery["state"]
        return (
            f"delivery {delivery['id']} of its SEG to {delivery['peer_ae_title']} is {what} "
            f"after {delivery['attempts']} attempt(s)"
        )
    return None


def _delete_rows(conn: sqlite3.Connection, study_uid: str, series: list[str]) -> list[str]:
    """Delete every row of a study inside the caller's write transaction; return its instances' paths."""
    marks = ", ".join("?" * len(series)) or "NULL"
    paths = [row[0] for row in conn.execute("SELECT path FROM instances WHERE study_instance_uid = ?", (study_uid,))]
    results = (
        "SELECT id FROM results WHERE study_instance_uid = ?"
        f" OR source_series_instance_uid IN ({marks})"
        f" OR job_id IN (SELECT id FROM jobs WHERE series_instance_uid IN ({marks}))"
    )
    params = (study_uid, *series, *series)
    conn.execute(f"DELETE FROM deliveries WHERE result_id IN ({results})", params)
    conn.execute(f"DELETE FROM results WHERE id IN ({results})", params)
    conn.execute(f"DELETE FROM jobs WHERE series_instance_uid IN ({marks})", series)
    conn.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_uid,))
    conn.execute(
        f"DELETE FROM series WHERE study_instance_uid = ? OR series_instance_uid IN ({marks})", (study_uid, *series)
    )
    return paths


class _FileRemover:
    """Deletes files and empty folders under the storage root, counting and collecting errors."""

    def __init__(self, storage: Storage, report: PurgeReport) -> None:
        self.storage = storage
        self.report = report

    def unlink(self, path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            self.report.file_errors.append(f"{path}: {exc}")
            logger.error("cannot remove %s: %s", path, exc)
            return False
        return True

    def rmtree(self, folder: Path) -> None:
        if not folder.is_dir():
            return
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            self.report.file_errors.append(f"{folder}: {exc}")
            logger.error("cannot remove %s: %s", folder, exc)

    def prune_empty(self, folder: Path) -> None:
        """Remove ``folder`` and its empty parents up to (not including) the top-level folders."""
        stop = {self.storage.layout.root, self.storage.layout.dicom_dir}
        while folder not in stop and self.storage.layout.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): leave it
                return
            folder = folder.parent

    def remove_study_files(self, study_uid: str, paths: Iterable[str], series: Iterable[str]) -> None:
        layout = self.storage.layout
        folders: set[Path] = set()
        # Inside a write transaction, so that no receiver indexes an instance between the check and
        # the unlink: an instance re-sent since its row was deleted keeps its file (the receiver, for
        # its part, rewrites a file that vanished before it indexed it).
        with self.storage.index._db.write() as conn:
            indexed = {
                row["path"]
                for row in conn.execute("SELECT path FROM instances WHERE study_instance_uid = ?", (study_uid,))
            }
            for relpath in paths:
                if relpath in indexed:
                    logger.info("%s was re-sent during the purge: kept", relpath)
                    continue
                path = layout.resolve(relpath)
                if self.unlink(path):
                    self.report.files_removed += 1
                folders.add(path.parent)
        for series_uid in series:
            try:
                nifti = layout.nifti_path(series_uid)
            except InvalidUIDError:  # a UID the layout never wrote files for
                continue
            for path in (nifti, nifti.with_name(nifti.name.replace(".nii.gz", _MASK_SUFFIX))):
                if self.unlink(path):
                    self.report.files_removed += 1
            self.rmtree(layout.series_results_dir(series_uid))
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            self.prune_empty(folder)


def purge_study(
    storage: Storage, study_uid: str, cutoff: float, include_failed: bool = False
) -> tuple[list[str], list[str]] | str:
    """Delete one study's rows in one transaction if it is still expired and not held.

    Returns
    -------
    tuple of (list of str, list of str) or str
        The removed instances' paths and the study's series UIDs (their files are for the
        caller to delete, after this commit), or the reason the study was kept.
    """
    with storage.index._db.write() as conn:  # package-internal: retention is part of storage
        last = conn.execute(
            "SELECT MAX(received_at) FROM instances WHERE study_instance_uid = ?", (study_uid,)
        ).fetchone()[0]
        if last is None:
            return "no longer stored"
        if last >= cutoff:
            return "received again since the purge started"
        reason = hold_reason(conn, study_uid, include_failed)
        if reason is not None:
            return reason
        series = _study_series(conn, study_uid)
        paths = _delete_rows(conn, study_uid, series)
    logger.info("study %s removed from the index (%d instances)", study_uid, len(paths))
    return paths, series


def remove_orphans(storage: Storage, cutoff: float, report: PurgeReport) -> None:
    """Delete files no index row names and last modified before ``cutoff`` (left by an interrupted purge).

    Looks at every file under ``dicom/`` (a study re-sent after the crash keeps its own
    files; its other leftovers go) and at NIfTI volumes of series absent from the index.
    Recent files are left alone: the receiver writes a file before indexing it. Each
    unlink is checked against the index again inside a write transaction, so a file an
    instance re-sent meanwhile has just been acknowledged with is kept.
    """
    layout = storage.layout
    with storage.index._db.read() as conn:  # package-internal: retention is part of storage
        indexed = {row[0] for row in conn.execute("SELECT path FROM instances")}
        series = {row[0] for row in conn.execute("SELECT series_instance_uid FROM series")}
    remover = _FileRemover(storage, report)
    candidates: list[Path] = []
    if layout.dicom_dir.is_dir():
        candidates.extend(p for p in layout.dicom_dir.rglob("*") if p.is_file() and layout.relative(p) not in indexed)
    if layout.nifti_dir.is_dir():
        for path in layout.nifti_dir.glob("*.nii.gz"):
            series_uid = path.name.removesuffix(_MASK_SUFFIX).removesuffix(".nii.gz")
            if series_uid not in series:
                candidates.append(path)
    for path in candidates:
        try:
            old = path.stat().st_mtime < cutoff
        except FileNotFoundError:
            continue
        if not old:
            continue
        if report.dry_run:
            report.orphans_removed += 1
            continue
        with storage.index._db.write() as conn:  # no receiver indexes it between this check and the unlink
            named = conn.execute("SELECT 1 FROM instances WHERE path = ?", (layout.relative(path),)).fetchone()
            removed = named is None and remover.unlink(path)
        if removed:
            report.orphans_removed += 1
            remover.prune_empty(path.parent)
            logger.info("orphan file %s removed", layout.relative(path))


def purge(
    storage: Storage,
    older_than_s: float,
    *,
    now: float | None = None,
    dry_run: bool = False,
    include_failed: bool = False,
    on_study: Callable[[StudySummary, bool], None] | None = None,
    studies: Callable[[list[StudySummary]], Iterable[StudySummary]] = iter,
) -> PurgeReport:
    """Remove every study received more than ``older_than_s`` seconds before ``now`` that is not held.

    Parameters
    ----------
    storage
        The storage root (the node may be running on it: every study is re-checked
        inside its own write transaction).
    older_than_s
        Retention period in seconds (>= 0).
    now
        POSIX time the period counts back from; defaults to the current time.
    dry_run
        Report what would be removed; change nothing.
    include_failed
        Also remove studies whose only undelivered SEGs failed for good.
    on_study
        Called with each study removed (or, in a dry run, to be removed) and ``dry_run``.
    studies
        Wraps the list of expired studies before iterating (e.g. a progress bar).

    Returns
    -------
    PurgeReport
    """
    if older_than_s < 0:
        raise ValueError(f"the retention period must be >= 0 days, got {older_than_s / SECONDS_PER_DAY:g}")
    now = time.time() if now is None else now
    cutoff = now - older_than_s
    report = PurgeReport(cutoff=cutoff, dry_run=dry_run)
    with storage.index._db.read() as conn:  # package-internal: retention is part of storage
        expired = expired_studies(conn, cutoff)
        reasons = {s.study_instance_uid: hold_reason(conn, s.study_instance_uid, include_failed) for s in expired}
    remover = _FileRemover(storage, report)
    for study in studies(expired):
        uid = study.study_instance_uid
        if dry_run:
            outcome: tuple[list[str], list[str]] | str = reasons[uid] or ([], [])
        else:
            outcome = purge_study(storage, uid, cutoff, include_failed)
        if isinstance(outcome, str):
            report.held.append(HeldStudy(study, outcome))
            logger.info("study %s kept: %s", uid, outcome)
            continue
        if not dry_run:
            remover.remove_study_files(uid, *outcome)
        report.removed.append(study)
        if on_study is not None:
            on_study(study, dry_run)
    remove_orphans(storage, cutoff, report)
    return report


def check_period_days(days: float | None) -> float:
    """Seconds of a retention period given in days; ``ValueError`` naming the problem otherwise."""
    if days is None:
        raise ValueError("no retention period: set storage.retention_days or pass --older-than DAYS")
    if not days > 0 or days == float("inf"):  # 0 would remove every finished study at once
        raise ValueError(f"the retention period must be a number of days > 0, got {days}")
    return float(days) * SECONDS_PER_DAY


__all__ = [
    "HeldStudy",
    "PurgeReport",
    "StudySummary",
    "check_period_days",
    "expired_studies",
    "hold_reason",
    "purge",
    "purge_study",
    "remove_orphans",
]
