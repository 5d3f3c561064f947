"""Receiving instances: persist, index, and decide when a series is complete.

A multi-frame NM instance is a complete series on arrival (no waiting). A
single-frame series is complete when its expected slice count is reached
(ImagesInAcquisition, or NumberOfSlices for PET) or, failing that, after
``series_idle_timeout`` seconds without a new instance (:meth:`Receiver.sweep_idle`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.sop_class import NuclearMedicineImageStorage

from node.audit import AuditLog
from node.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from storage import SEGMENT_JOB, Storage, StorageError, StorageFullError

log = logging.getLogger(__name__)


def expected_instances(ds: Dataset) -> int | None:
    """How many single-frame instances the sender says the series has, if it says so."""
    for keyword in ("ImagesInAcquisition", "NumberOfSlices"):
        value = ds.get(keyword)
        try:
            count = int(value) if value is not None else 0
        except (TypeError, ValueError):
            continue
        if count > 1:
            return count
    return None


def is_complete_on_arrival(ds: Dataset) -> bool:
    """A multi-frame NM instance holds its whole series."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return str(ds.get("SOPClassUID", "")) == NuclearMedicineImageStorage and frames > 1


class Receiver:
    """The C-STORE sink of the node (see :class:`node.scp.InstanceSink`).

    Parameters
    ----------
    storage
        Files and index (which refuses new data below its free-space watermark: ``0xA700``).
    on_job_queued
        Called when a series is complete and its job queued.
    audit
        Where each received or refused instance is recorded, with its patient.
    """

    def __init__(
        self, storage: Storage, on_job_queued: Callable[[], None] = lambda: None, audit: AuditLog | None = None
    ) -> None:
        self.storage = storage
        self.on_job_queued = on_job_queued
        self.audit = audit or AuditLog(None)

    def store(
        self, encoded: bytes, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_ae: str
    ) -> int:
        """Persist one instance (atomically), index it, update series assembly; return the status."""
        status, reason = self._store(encoded, sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae)
        if status != SUCCESS:
            self.audit.record(
                "instance-refused",
                calling_ae=calling_ae,
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                status=f"0x{status:04X}",
                reason=reason,
            )
        return status

    def _store(
        self, encoded: bytes, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_ae: str
    ) -> tuple[int, str | None]:
        try:
            ds = dcmread(io.BytesIO(encoded), stop_before_pixels=True)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                if not ds.get(keyword):
                    raise ValueError(f"missing {keyword}")
            if str(ds.SOPInstanceUID) != sop_instance_uid:
                raise ValueError("SOP Instance UID of the dataset differs from the request's")
        except (InvalidDicomError, ValueError, TypeError, AttributeError, EOFError, KeyError) as exc:
            log.warning(
                "C-STORE %s from %s refused: cannot understand the dataset: %s", sop_instance_uid, calling_ae, exc
            )
            return CANNOT_UNDERSTAND, f"cannot understand the dataset: {exc}"
        try:
            record, is_new = self.storage.store_instance(
                encoded, ds, calling_ae_title=calling_ae, transfer_syntax_uid=transfer_syntax_uid
            )
        except StorageFullError as exc:
            log.error("C-STORE %s refused: storage full: %s", sop_instance_uid, exc)
            return OUT_OF_RESOURCES, f"storage full: {exc}"
        except (StorageError, OSError) as exc:
            log.error("C-STORE %s refused: cannot store: %s", sop_instance_uid, exc)
            return OUT_OF_RESOURCES, f"cannot store: {exc}"
        except ValueError as exc:  # invalid UIDs and the like
            log.warning("C-STORE %s refused: %s", sop_instance_uid, exc)
            return CANNOT_UNDERSTAND, str(exc)
        log.info(
            "received %s series=%s study=%s from %s%s",
            record.sop_instance_uid,
            record.series_instance_uid,
            record.study_instance_uid,
            calling_ae,
            "" if is_new else " (re-sent, unchanged)",
        )
        self.audit.record(
            "instance-received",
            calling_ae=calling_ae,
            patient_id=record.patient_id,
            patient_name=record.patient_name,
            study_instance_uid=record.study_instance_uid,
            series_instance_uid=record.series_instance_uid,
            sop_instance_uid=record.sop_instance_uid,
            sop_class_uid=sop_class_uid,
            resent=not is_new,
        )
        if is_new:
            self._assemble(ds, record.series_instance_uid)
        return SUCCESS, None

    def _assemble(self, ds: Dataset, series_uid: str) -> None:
        index = self.storage.index
        if is_complete_on_arrival(ds):
            job = index.mark_series_complete(series_uid, job_kind=SEGMENT_JOB)
            log.info("series %s complete on arrival (multi-frame NM); job %s queued", series_uid, job)
            self.on_job_queued()
            return
        expected = expected_instances(ds)
        if expected is not None:
            index.set_expected_instances(series_uid, expected)
        series = index.series(series_uid)
        if series is not None and series.expected_instances and series.n_instances >= series.expected_instances:
            job = index.mark_series_complete(series_uid, job_kind=SEGMENT_JOB)
            log.info("series %s complete (%d instances); job %s queued", series_uid, series.n_instances, job)
            self.on_job_queued()

    def sweep_idle(self, idle_timeout: float, now: float | None = None) -> list[str]:
        """Complete every receiving series idle for ``idle_timeout`` seconds; returns their UIDs."""
        now = time.time() if now is None else now
        completed = []
        for series in self.storage.index.series_idle_since(now - idle_timeout):
            job = self.storage.index.mark_series_complete(series.series_instance_uid, job_kind=SEGMENT_JOB)
            log.info(
                "series %s complete after %.0f s idle (%d instances); job %s queued",
                series.series_instance_uid,
                idle_timeout,
                series.n_instances,
                job,
            )
            completed.append(series.series_instance_uid)
        if completed:
            self.on_job_queued()
        return completed
