"""The audit log: append-only, one JSON object per line, the only place patient identifiers go.

The normal log (``logging``) names studies and series by UID only; who asked for what,
and the patient it concerned, is written here.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from storage.retention import StudySummary

log = logging.getLogger(__name__)


class AuditLogError(ValueError):
    """The audit file cannot be opened (the node does not start without its audit trail)."""


class AuditLog:
    """Append JSON lines to ``path`` (created with its folder, mode 0600); ``None`` records nothing.

    Each line holds ``time`` (UTC, ISO 8601), ``event`` and the given fields. Appends are
    serialised by a lock and flushed at once, so lines from concurrent associations never
    interleave and a crash of the node loses at most the line being written; with
    ``fsync`` each line also reaches the disk before :meth:`record` returns (survives a
    power cut, at one disk flush per event). A failing write is logged and never raised:
    auditing must not stop the node from receiving.
    """

    def __init__(self, path: str | os.PathLike[str] | None, fsync: bool = False) -> None:
        self.path = None if path is None else Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._handle = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # created readable by its owner only: it holds patient identifiers
                descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as exc:
                raise AuditLogError(f"{self.path}: cannot open the audit log: {exc}") from exc
            self._handle = os.fdopen(descriptor, "a", encoding="utf-8")

    def record(self, event: str, **fields: Any) -> None:
        """Append one event; ``None`` values are left out."""
        if self._handle is None:
            return
        entry = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"), "event": event}
        entry.update({key: value for key, value in fields.items() if value is not None})
        line = json.dumps(entry, default=str, ensure_ascii=False)
        with self._lock:
            try:
                self._handle.write(line + "\n")
                self._handle.flush()
                if self.fsync:
                    os.fsync(self._handle.fileno())
            except (OSError, ValueError) as exc:  # ValueError: closed file
                log.error("audit log %s: cannot write: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


def record_study_purged(audit: AuditLog, study: StudySummary, retention_days: float, by: str) -> None:
    """The ``study-purged`` event of one study removed by retention (``by``: ``purge`` or ``node``)."""
    audit.record(
        "study-purged",
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        instances=study.n_instances,
        retention_days=retention_days,
        by=by,
    )


def identifier_keys(identifier: object) -> dict[str, str]:
    """The non-empty attributes of a query identifier as ``{keyword: value}`` (for the audit log)."""
    keys: dict[str, str] = {}
    try:
        for element in identifier:  # type: ignore[attr-defined]
            if element.VR != "SQ" and element.value not in (None, "", b""):
                keys[element.keyword or str(element.tag)] = str(element.value)
    except Exception:  # an undecodable identifier is audited without its keys
        return {}
    return keys


def read_audit(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All events of an audit file, oldest first."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
