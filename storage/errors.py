"""Exceptions raised by the storage package.

Every failure to persist something derives from :class:`StorageError`, so the
DICOM SCP can answer one "out of resources" status for all of them and a
finer one for :class:`StorageFullError`.
"""

from __future__ import annotations


class StorageError(Exception):
    """A file or index row could not be written or read."""


class StorageFullError(StorageError):
    """The disk (or the user's quota) is full: nothing was persisted."""


class SchemaVersionError(StorageError):
    """The index database was written by a newer version of the code."""


class InvalidUIDError(StorageError, ValueError):
    """A UID cannot safely name a file (empty, too long, or odd characters)."""


class RecordNotFoundError(StorageError, LookupError):
    """No row with the given key exists in the index."""


class JobStateError(StorageError):
    """A job or delivery is not in a state that allows the requested change."""
