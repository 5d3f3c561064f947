"""Files on disk, the SQLite index and the job queue of the node.

Imports no other package of the project. Typical use::

    storage = Storage.open(root, recover=True)
    record, is_new = storage.store_instance(data, ds, calling_ae_title="PACS")
    job_id = storage.index.mark_series_complete(series_uid, job_kind=SEGMENT_JOB)
    job = storage.index.claim_job("worker-1")
"""

from storage.errors import (
    InvalidUIDError,
    JobStateError,
    RecordNotFoundError,
    SchemaVersionError,
    StorageError,
    StorageFullError,
)
from storage.index import Index
from storage.jobs import SEGMENT_JOB
from storage.layout import StorageLayout, atomic_write_bytes, check_uid, free_bytes
from storage.query import (
    InformationModel,
    InstanceMatch,
    Match,
    PatientMatch,
    Query,
    QueryError,
    QueryLevel,
    SeriesMatch,
    StudyMatch,
)
from storage.records import (
    DeliveryRecord,
    DeliveryState,
    InstanceRecord,
    Job,
    JobState,
    JobTimings,
    NewResult,
    ResultRecord,
    SeriesRecord,
    SeriesState,
    StoredFile,
)
from storage.results import next_backoff
from storage.schema import LATEST_VERSION
from storage.store import Storage

__all__ = [
    "LATEST_VERSION",
    "SEGMENT_JOB",
    "DeliveryRecord",
    "DeliveryState",
    "Index",
    "InformationModel",
    "InstanceMatch",
    "InstanceRecord",
    "InvalidUIDError",
    "Job",
    "JobState",
    "JobStateError",
    "JobTimings",
    "Match",
    "NewResult",
    "PatientMatch",
    "Query",
    "QueryError",
    "QueryLevel",
    "RecordNotFoundError",
    "ResultRecord",
    "SchemaVersionError",
    "SeriesMatch",
    "SeriesRecord",
    "SeriesState",
    "Storage",
    "StorageError",
    "StorageFullError",
    "StorageLayout",
    "StoredFile",
    "StudyMatch",
    "atomic_write_bytes",
    "check_uid",
    "free_bytes",
    "next_backoff",
]
