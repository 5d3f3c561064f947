"""One object for a storage root: its file layout and its index.

:meth:`Storage.store_instance` is what the DICOM SCP calls for each C-STORE:
check free space, write the file atomically, and only then index it, so the
index never names a file that is not complete on disk.
"""

from __future__ import annotations

import logging
import os
import time
from types import TracebackType

from pydicom.dataset import Dataset

from storage.errors import StorageFullError
from storage.index import Index
from storage.layout import StorageLayout, free_bytes
from storage.records import InstanceRecord

logger = logging.getLogger(__name__)


class Storage:
    """Files on disk plus the index of one storage root.

    Parameters
    ----------
    layout : StorageLayout
        The folder structure.
    index : Index
        The open index of that root.
    min_free_bytes : int
        Refuse to store an instance that would leave less free space than this.
    """

    def __init__(self, layout: StorageLayout, index: Index, min_free_bytes: int = 0) -> None:
        self.layout = layout
        self.index = index
        self.min_free_bytes = min_free_bytes

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        min_free_bytes: int = 0,
        busy_timeout_s: float = 30.0,
        recover: bool = False,
        job_max_attempts: int | None = None,
    ) -> Storage:
        """Create the folders of ``root`` if needed and open its index.

        See :meth:`storage.index.Index.open` for ``busy_timeout_s``, ``recover`` and
        ``job_max_attempts``.
        """
        layout = StorageLayout(root)
        layout.create()
        index = Index.open(
            layout.index_path, busy_timeout_s=busy_timeout_s, recover=recover, job_max_attempts=job_max_attempts
        )
        return cls(layout, index, min_free_bytes=min_free_bytes)

    def free_bytes_if_low(self) -> int | None:
        """The free bytes under the storage root when below ``min_free_bytes``, else ``None``."""
        if self.min_free_bytes <= 0:
            return None
        available = free_bytes(self.layout.root)
        return available if available < self.min_free_bytes else None

    def close(self) -> None:
        """Close the index."""
        self.index.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def store_instance(
        self,
        data: bytes,
        ds: Dataset,
        *,
        calling_ae_title: str | None,
        transfer_syntax_uid: str | None = None,
        is_result: bool = False,
        received_at: float | None = None,
    ) -> tuple[InstanceRecord, bool]:
        """Persist one instance: file first (atomic), then its index row.

        Parameters
        ----------
        data : bytes
            The instance encoded as a DICOM file, as received.
        ds : pydicom.dataset.Dataset
            The same instance decoded (its attributes fill the index row).
        calling_ae_title : str or None
            Sender's AE title; None for objects the node made itself.
        transfer_syntax_uid : str or None
            Transfer syntax of ``data``; defaults to ``ds.file_meta``'s.
        is_result : bool
            True for a SEG made by the node.
        received_at : float or None
            POSIX time of reception; defaults to now.

        Returns
        -------
        record : InstanceRecord
            The indexed record.
        is_new : bool
            False if the SOP Instance UID was already stored (a re-send).

        Raises
        ------
        StorageFullError
            If there is not enough free space (nothing is written).
        InvalidUIDError
            If a UID cannot name a file.
        ValueError
            If an identifying UID is missing from ``ds``.
        StorageError
            If the file or the row could not be written.
        """
        received_at = time.time() if received_at is None else received_at
        available = free_bytes(self.layout.root)
        if available - len(data) < self.min_free_bytes:
            raise StorageFullError(
                f"{available} bytes free: storing {len(data)} more would leave less than "
                f"the {self.min_free_bytes} bytes to keep free"
            )
        study_uid = str(ds.get("StudyInstanceUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        stored = self.layout.write_instance_bytes(study_uid, series_uid, sop_uid, data)
        record = InstanceRecord.from_dataset(
            ds,
            path=stored.path,
            size_bytes=stored.size_bytes,
            received_at=received_at,
            calling_ae_title=calling_ae_title,
            transfer_syntax_uid=transfer_syntax_uid,
            is_result=is_result,
        )
        is_new = self.index.add_instance(record)
        if not self.layout.resolve(stored.path).exists():
            # a purge of an old study removed the file before this instance was indexed: write it again
            logger.info("instance %s: file removed by a concurrent purge, written again", sop_uid)
            self.layout.write_instance_bytes(study_uid, series_uid, sop_uid, data)
        logger.debug("stored %s (%s, %d bytes)", sop_uid, "new" if is_new else "re-sent", stored.size_bytes)
        return record, is_new
