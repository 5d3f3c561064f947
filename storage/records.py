"""Typed, immutable records exchanged with the storage package.

Every row of the index maps onto one frozen dataclass; field names are the
column names. Timestamps are POSIX seconds (``time.time()``, UTC), dates and
times of DICOM attributes keep their DICOM string form (``YYYYMMDD``,
``HHMMSS.FFFFFF``) so that range matching is a string comparison in SQL.
Multi-valued attributes (``ImageType``) are stored joined by a backslash, as
DICOM encodes them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

logger = logging.getLogger(__name__)


class SeriesState(enum.StrEnum):
    """Where a series is in its assembly."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    """Life cycle of a job: queued -> running -> done | failed | skipped."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def is_active(self) -> bool:
        """True for the states of a job that still has work to do."""
        return self in (JobState.QUEUED, JobState.RUNNING)


class DeliveryState(enum.StrEnum):
    """Life cycle of the sending of one result to one peer."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file written under the storage root.

    Attributes
    ----------
    path : str
        Path relative to the storage root, with ``/`` separators.
    size_bytes : int
        Size of the file on disk.
    written : bool
        False when an identical file was already there and was kept.
    """

    path: str
    size_bytes: int
    written: bool


@dataclass(frozen=True, slots=True)
class JobTimings:
    """Seconds spent in each stage of a segmentation job (None: not run)."""

    convert_s: float | None = None
    infer_s: float | None = None
    encode_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRecord:
    """One stored SOP instance with the attributes query/retrieve needs.

    Patient, study and series attributes are repeated on every instance so
    that a query at any level is a ``SELECT DISTINCT`` over one table.
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    received_at: float
    calling_ae_title: str | None = None
    is_result: bool = False
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    series_date: str | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None
    image_type: str | None = None

    @classmethod
    def from_dataset(
        cls,
        ds: Dataset,
        *,
        path: str,
        size_bytes: int,
        received_at: float,
        calling_ae_title: str | None = None,
        transfer_syntax_uid: str | None = None,
        is_result: bool = False,
    ) -> InstanceRecord:
        """Build the record of a received dataset.

        Tolerant of missing or malformed optional attributes (they become
        None); strict about the four UIDs that identify the instance.

        Parameters
        ----------
        ds : pydicom.dataset.Dataset
            The dataset as received (only its attributes are read).
        path : str
            Path of the stored file, relative to the storage root.
        size_bytes : int
            Size of the stored file.
        received_at : float
            POSIX time of reception.
        calling_ae_title : str or None
            AE title of the sender; None for instances the node made itself.
        transfer_syntax_uid : str or None
            Transfer syntax of the stored bytes; defaults to the dataset's
            file meta ``TransferSyntaxUID``.
        is_result : bool
            True for a SEG (or other object) produced by the node itself.

        Raises
        ------
        ValueError
            If a UID that identifies the instance or its transfer syntax is missing.
        """
        file_meta = getattr(ds, "file_meta", None)
        sop_class_uid = _text(ds, "SOPClassUID")
        if sop_class_uid is None and file_meta is not None:
            sop_class_uid = _text(file_meta, "MediaStorageSOPClassUID")
        if transfer_syntax_uid is None and file_meta is not None:
            transfer_syntax_uid = _text(file_meta, "TransferSyntaxUID")
        if transfer_syntax_uid is None:
            raise ValueError("the transfer syntax of the stored bytes is unknown")
        return cls(
            sop_instance_uid=_required(ds, "SOPInstanceUID"),
            sop_class_uid=_required_value(sop_class_uid, "SOPClassUID"),
            series_instance_uid=_required(ds, "SeriesInstanceUID"),
            study_instance_uid=_required(ds, "StudyInstanceUID"),
            transfer_syntax_uid=transfer_syntax_uid,
            path=path,
            size_bytes=size_bytes,
            received_at=received_at,
            calling_ae_title=calling_ae_title,
            is_result=is_result,
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
            patient_birth_date=_text(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"),
            study_id=_text(ds, "StudyID"),
            study_description=_text(ds, "StudyDescription"),
            referring_physician_name=_text(ds, "ReferringPhysicianName"),
            modality=_text(ds, "Modality"),
            series_number=_integer(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            series_date=_text(ds, "SeriesDate"),
            instance_number=_integer(ds, "InstanceNumber"),
            number_of_frames=_integer(ds, "NumberOfFrames"),
            image_type=_text(ds, "ImageType"),
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> InstanceRecord:
        """Build the record from an index row (column name -> value)."""
        values = dict(row)
        values["is_result"] = bool(values["is_result"])
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesRecord:
    """A series as the index sees it while it is being received."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    first_received_at: float
    last_received_at: float
    expected_instances: int | None
    n_instances: int
    state: SeriesState
    completed_at: float | None
    is_result: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SeriesRecord:
        """Build the record from an index row (column name -> value)."""
        values = dict(row)
        values["state"] = SeriesState(values["state"])
        values["is_result"] = bool(values["is_result"])
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A unit of work on one series (a segmentation, for now)."""

    id: int
    series_instance_uid: str
    kind: str
    state: JobState
    reason: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    claimed_by: str | None
    not_before: float | None
    convert_s: float | None
    infer_s: float | None
    encode_s: float | None

    @property
    def timings(self) -> JobTimings:
        """Seconds spent in each stage."""
        return JobTimings(self.convert_s, self.infer_s, self.encode_s)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        """Build the record from an index row (column name -> value)."""
        values = dict(row)
        values["state"] = JobState(values["state"])
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class NewResult:
    """What a job produced, before the index gives it an id (see :class:`ResultRecord`)."""

    job_id: int | None
    study_instance_uid: str
    source_series_instance_uid: str
    seg_sop_instance_uid: str
    seg_series_instance_uid: str
    path: str
    myocardium_volume_ml: float | None
    model_name: str
    model_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultRecord:
    """A segmentation produced by a job and stored as a DICOM SEG instance."""

    id: int
    job_id: int | None
    study_instance_uid: str
    source_series_instance_uid: str
    seg_sop_instance_uid: str
    seg_series_instance_uid: str
    path: str
    myocardium_volume_ml: float | None
    model_name: str
    model_version: str
    created_at: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ResultRecord:
        """Build the record from an index row (column name -> value)."""
        return cls(**dict(row))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRecord:
    """The sending of one result to one peer, retried until acknowledged."""

    id: int
    result_id: int
    peer_ae_title: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DeliveryRecord:
        """Build the record from an index row (column name -> value)."""
        values = dict(row)
        values["state"] = DeliveryState(values["state"])
        return cls(**values)


def _text(ds: Dataset, keyword: str) -> str | None:
    """Return an attribute as text (multi-values joined by a backslash), or None if absent/empty."""
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue):
        text = "\\".join(str(item) for item in value)
    else:
        text = str(value)
    text = text.strip(" \x00")
    return text or None


def _integer(ds: Dataset, keyword: str) -> int | None:
    """Return an IS/US attribute as an int, or None if absent, empty or malformed."""
    value = ds.get(keyword)
    if value is None or value == "" or isinstance(value, MultiValue):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        logger.debug("ignoring malformed %s value %r", keyword, value)
        return None


def _required(ds: Dataset, keyword: str) -> str:
    """Return a UID attribute that must be present."""
    return _required_value(_text(ds, keyword), keyword)


def _required_value(value: str | None, keyword: str) -> str:
    if value is None:
        raise ValueError(f"the dataset has no {keyword}")
    return value
