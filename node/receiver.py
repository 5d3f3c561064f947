"""Receiving instances: persist, index, and decide when a series is complete.

A multi-frame NM instance is a complete series on arrival (no waiting). A
single-frame series is complete when its expected slice count is reached
(ImagesInAcquisition, or NumberOfSlices for PET) or, failing that, after
``series_idle_timeout`` seconds without a new instance (:meth:`Receiver.sweep_idle`).
A series that announced its count and is still short of it waits longer,
``series_incomplete_timeout`` seconds, before it is processed as it is: a sender that
stalls for a few seconds then does not cause a job on half a series and a second SEG.

What is refused at C-STORE, before anything is written (see :meth:`Receiver.store`):
bytes that do not decode as a DICOM data set, a data set cut short (an element holding
fewer bytes than its length announces, or ending inside an element header), a data set
without its identifying UIDs (``0xC210``), and one whose SOP Class or Instance UID is not
the one of the request (``0xA900``). Anything that decodes is kept, even if it cannot be
processed later: its job then fails with the reason.
"""

from __future__ import annotations

import io
import logging
import time
import zlib
from collections.abc import Callable

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.sop_class import NuclearMedicineImageStorage

from node.audit import AuditLog
from node.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from storage import SEGMENT_JOB, InvalidUIDError, Storage, StorageError, StorageFullError

log = logging.getLogger(__name__)

# PS3.4 B.2.3: Error, "Data Set does not match SOP Class" (also used, as DCMTK does, when
# the data set's SOP Instance UID is not the request's Affected SOP Instance UID).
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
IDENTIFYING_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
MAX_EXPECTED_INSTANCES = 100_000  # a larger ImagesInAcquisition is not a slice count: ignored
_UNDEFINED_LENGTH = 0xFFFFFFFF


class RefusedInstance(Exception):
    """A received instance the node refuses, with the DIMSE status to answer.

    Parameters
    ----------
    status
        ``0xC210`` (cannot understand) or ``0xA900`` (data set does not match SOP class).
    reason
        What is wrong, for the log and the audit trail.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def truncation_problem(encoded: bytes, transfer_syntax_uid: str) -> str | None:
    """Why the data set in ``encoded`` is cut short, or None if it is complete.

    pydicom reads a truncated stream without complaint (the last value is simply
    shorter), so the elements are walked here: each must hold the bytes its length
    announces, and the last must end where the bytes end.

    Parameters
    ----------
    encoded
        A Part 10 file as received (preamble, file meta information, data set).
    transfer_syntax_uid
        Transfer syntax of the data set (Deflated is inflated first).

    Returns
    -------
    str or None
        The problem, naming the element where the data stops.
    """
    fp = io.BytesIO(encoded)
    fp.seek(132 if encoded[128:132] == b"DICM" else 0)
    for _ in data_element_generator(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2):
        pass
    body = encoded[fp.tell() :]
    syntax = UID(transfer_syntax_uid)
    if syntax == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body) + inflater.flush()
        except zlib.error as exc:
            return f"the deflated data set cannot be inflated: {exc}"
        if not inflater.eof:
            return "the deflated data set is truncated"
    fp = io.BytesIO(body)
    end = 0
    for element in data_element_generator(fp, syntax.is_implicit_VR, syntax.is_little_endian):
        if isinstance(element, RawDataElement) and element.length != _UNDEFINED_LENGTH:
            held = len(element.value or b"")
            if held < element.length:
                return f"element {element.tag} holds {held} of its {element.length} bytes: the data set is truncated"
        end = fp.tell()
    if end != len(body):
        return f"the data set ends {len(body) - end} bytes into an element header: truncated"
    return None


def decode_received(encoded: bytes, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> Dataset:
    """Decode a received instance completely and check it against its C-STORE request.

    Parameters
    ----------
    encoded
        The instance as received (Part 10 bytes).
    sop_class_uid, sop_instance_uid
        Affected SOP Class and Instance UIDs of the request.
    transfer_syntax_uid
        Transfer syntax of the presentation context.

    Returns
    -------
    pydicom.dataset.Dataset
        Every element decoded (pixel data included).

    Raises
    ------
    RefusedInstance
        ``0xC210`` for bytes that are not a decodable DICOM data set, a truncated data
        set or missing identifying UIDs; ``0xA900`` when the data set's SOP Class or SOP
        Instance UID differs from the request's.
    """
    try:
        problem = truncation_problem(encoded, transfer_syntax_uid)
    except Exception as exc:  # any parser error on network bytes: reported below
        problem = f"its elements cannot be parsed ({type(exc).__name__}: {exc})"
    try:
        ds = dcmread(io.BytesIO(encoded))
        for _ in ds.iterall():  # decode every value now: a value that cannot be decoded is refused here
            pass
        present = [keyword for keyword in IDENTIFYING_UIDS if ds.get(keyword)]
    except Exception as exc:  # anything the parser raises on network bytes means "cannot understand"
        reason = problem or f"not a readable DICOM data set ({type(exc).__name__}: {exc})"
        raise RefusedInstance(CANNOT_UNDERSTAND, reason) from exc
    if not present:
        reason = "not a DICOM data set: no SOP Class, SOP Instance, Study or Series UID"
        raise RefusedInstance(CANNOT_UNDERSTAND, reason + (f" ({problem})" if problem else ""))
    if problem is not None:
        raise RefusedInstance(CANNOT_UNDERSTAND, problem)
    missing = [keyword for keyword in IDENTIFYING_UIDS if keyword not in present]
    if missing:
        raise RefusedInstance(CANNOT_UNDERSTAND, f"the data set has no {', '.join(missing)}")
    for keyword in IDENTIFYING_UIDS:
        if not isinstance(ds[keyword].value, str):
            raise RefusedInstance(CANNOT_UNDERSTAND, f"{keyword} holds {ds[keyword].VM} values, not one UID")
    if str(ds.SOPClassUID) != sop_class_uid:
        raise RefusedInstance(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"the data set's SOP Class UID {ds.SOPClassUID} is not the request's {sop_class_uid}",
        )
    if str(ds.SOPInstanceUID) != sop_instance_uid:
        raise RefusedInstance(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"the data set's SOP Instance UID {ds.SOPInstanceUID} is not the request's {sop_instance_uid}",
        )
    return ds


def expected_instances(ds: Dataset) -> int | None:
    """How many single-frame instances the sender says the series has, if it says so."""
    for keyword in ("ImagesInAcquisition", "NumberOfSlices"):
        value = ds.get(keyword)
        try:
            count = int(value) if value is not None else 0
        except (TypeError, ValueError):
            continue
        if 1 < count <= MAX_EXPECTED_INSTANCES:
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
        """Persist one instance (atomically), index it, update series assembly; return the status.

        Returns
        -------
        int
            ``0x0000`` once the instance is on disk and indexed; ``0xC210`` (cannot
            understand) for bytes that are not a complete DICOM data set with its UIDs
            or UIDs that cannot name a file; ``0xA900`` (data set does not match SOP
            class) when its SOP Class or Instance UID is not the request's; ``0xA700``
            (out of resources) when it cannot be written. A refusal is logged with its
            reason and nothing is written.
        """
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
            ds = decode_received(encoded, sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        except RefusedInstance as refused:
            log.warning(
                "C-STORE %s from %s refused (0x%04X): %s", sop_instance_uid, calling_ae, refused.status, refused.reason
            )
            return refused.status, refused.reason
        try:
            record, is_new = self.storage.store_instance(
                encoded, ds, calling_ae_title=calling_ae, transfer_syntax_uid=transfer_syntax_uid
            )
        except InvalidUIDError as exc:  # the sender's UID, not the node's disk, is at fault
            log.warning("C-STORE %s from %s refused (0x%04X): %s", sop_instance_uid, calling_ae, CANNOT_UNDERSTAND, exc)
            return CANNOT_UNDERSTAND, str(exc)
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
            try:
                self._assemble(ds, record.series_instance_uid)
            except Exception:  # stored and indexed: the idle sweep completes the series instead
                log.exception(
                    "series assembly after %s failed; series %s will complete after the idle timeout",
                    record.sop_instance_uid,
                    record.series_instance_uid,
                )
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

    def sweep_idle(
        self, idle_timeout: float, now: float | None = None, incomplete_timeout: float | None = None
    ) -> list[str]:
        """Complete every receiving series idle long enough; returns their UIDs.

        Parameters
        ----------
        idle_timeout
            Seconds without a new instance after which a series without an expected
            count counts as complete.
        now
            POSIX time to measure from (default: the current time).
        incomplete_timeout
            Seconds without a new instance after which a series still short of its
            expected count is processed as it is (a warning names the shortfall);
            ``None``: the same as ``idle_timeout``.
        """
        now = time.time() if now is None else now
        patience = idle_timeout if incomplete_timeout is None else max(idle_timeout, incomplete_timeout)
        completed = []
        for series in self.storage.index.series_idle_since(now - idle_timeout):
            short = series.expected_instances is not None and series.n_instances < series.expected_instances
            if short and series.last_received_at > now - patience:
                continue  # it said how many instances it has: wait longer for the rest
            job = self.storage.index.mark_series_complete(
                series.series_instance_uid, job_kind=SEGMENT_JOB, idle_since=series.last_received_at
            )
            if job is None:
                continue  # an instance arrived since the snapshot: the series is receiving again
            if short:
                log.warning(
                    "series %s processed with %d of its %d announced instances after %.0f s without a new one; "
                    "job %s queued",
                    series.series_instance_uid,
                    series.n_instances,
                    series.expected_instances,
                    patience,
                    job,
                )
            else:
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
