"""Where files live under the storage root, and how they are written safely.

Layout (all paths relative to ``root``)::

    dicom/<study_uid>/<series_uid>/<sop_uid>.dcm   every stored instance (received or made)
    nifti/<series_uid>.nii.gz                     volumes converted from a series
    results/<series_uid>/...                      other per-series outputs (reports, figures)
    index.sqlite3                                 the SQLite index (see :mod:`storage.index`)

Files are written atomically: a temporary file in the target directory,
``fsync``, ``os.replace``, then ``fsync`` of the directory. A write that fails
leaves no partial file and raises :class:`~storage.errors.StorageFullError`
(no space left) or :class:`~storage.errors.StorageError` (anything else).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from storage.errors import InvalidUIDError, StorageError, StorageFullError
from storage.records import StoredFile

logger = logging.getLogger(__name__)

# Characters allowed in a UID used as a file name. Conformant UIDs only hold
# digits and dots; letters, '-' and '_' are tolerated for non-conformant senders.
_SAFE_UID = re.compile(r"[0-9A-Za-z._-]{1,64}")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_CHUNK_BYTES = 1 << 20


def free_bytes(root: str | os.PathLike[str]) -> int:
    """Bytes available to this (unprivileged) process on the file system holding ``root``."""
    return shutil.disk_usage(root).free


def check_uid(uid: str) -> str:
    """Return ``uid`` if it can name a file or folder, else raise.

    Raises
    ------
    InvalidUIDError
        If the UID is empty, longer than 64 characters, made only of dots,
        or holds anything but letters, digits, ``.``, ``-`` and ``_``.
    """
    if not isinstance(uid, str) or not _SAFE_UID.fullmatch(uid) or set(uid) == {"."}:
        raise InvalidUIDError(f"cannot use {uid!r} as a file name")
    return uid


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either complete or absent.

    Creates missing parent folders (and makes their entries durable), writes a
    temporary file in the same folder, flushes it to disk, renames it over
    ``path`` and flushes the folder.

    Raises
    ------
    StorageFullError
        If the disk or quota is full (``ENOSPC``/``EDQUOT``).
    StorageError
        For any other ``OSError``; the original error is chained.
    """
    tmp_path: str | None = None
    try:
        _make_dirs_durable(path.parent)
        fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view[:_CHUNK_BYTES])
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
        tmp_path = None
        _fsync_dir(path.parent)
    except OSError as exc:
        if tmp_path is not None:
            _remove_quietly(Path(tmp_path))
        if exc.errno in _FULL_ERRNOS:
            raise StorageFullError(f"no space left to write {path.name}: {exc}") from exc
        raise StorageError(f"cannot write {path.name}: {exc}") from exc


class StorageLayout:
    """The folder structure under one storage root.

    Parameters
    ----------
    root : path-like
        Folder holding everything the node stores; created on demand.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def index_path(self) -> Path:
        """Path of the SQLite index."""
        return self.root / "index.sqlite3"

    @property
    def dicom_dir(self) -> Path:
        """Folder of all stored DICOM instances."""
        return self.root / "dicom"

    @property
    def nifti_dir(self) -> Path:
        """Folder of the NIfTI volumes converted from series."""
        return self.root / "nifti"

    @property
    def results_dir(self) -> Path:
        """Folder of the per-series outputs other than DICOM instances."""
        return self.root / "results"

    def create(self) -> None:
        """Create the root and its top-level folders if missing."""
        for folder in (self.dicom_dir, self.nifti_dir, self.results_dir):
            try:
                _make_dirs_durable(folder)
            except OSError as exc:
                message = f"{self.root}: cannot use the storage folder: cannot create {folder}: {exc}"
                raise StorageError(message) from exc

    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Relative path (``/`` separators) of an instance; raises InvalidUIDError for unsafe UIDs."""
        parts = ("dicom", check_uid(study_uid), check_uid(series_uid), f"{check_uid(sop_uid)}.dcm")
        return str(PurePosixPath(*parts))

    def nifti_path(self, series_uid: str) -> Path:
        """Absolute path of the NIfTI volume converted from a series."""
        return self.nifti_dir / f"{check_uid(series_uid)}.nii.gz"

    def series_results_dir(self, series_uid: str) -> Path:
        """Folder for the non-DICOM outputs derived from a series (not created here)."""
        return self.results_dir / check_uid(series_uid)

    def resolve(self, relpath: str) -> Path:
        """Absolute path of a path stored in the index (relative to the root).

        Raises
        ------
        StorageError
            If the path is absolute or climbs out of the root.
        """
        pure = PurePosixPath(relpath)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise StorageError(f"{relpath!r} is not a path inside the storage root")
        return self.root.joinpath(*pure.parts)

    def relative(self, path: Path) -> str:
        """Path relative to the root with ``/`` separators (the form stored in the index)."""
        return path.relative_to(self.root).as_posix()

    def write_instance_bytes(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Store the encoded bytes of one instance, atomically and idempotently.

        The same SOP Instance UID always maps to the same file. If that file
        already holds exactly ``data`` it is kept; otherwise it is replaced
        atomically.

        Parameters
        ----------
        study_uid, series_uid, sop_uid : str
            Study, Series and SOP Instance UIDs of the instance.
        data : bytes
            The instance as a DICOM file (preamble, file meta and data set).

        Returns
        -------
        StoredFile
            Relative path, size and whether the file was (re)written.

        Raises
        ------
        InvalidUIDError
            If a UID cannot name a file.
        StorageFullError, StorageError
            If the file could not be written; no partial file is left.
        """
        relpath = self.instance_relpath(study_uid, series_uid, sop_uid)
        path = self.resolve(relpath)
        if _has_content(path, data):
            logger.debug("instance %s already stored with identical bytes", sop_uid)
            return StoredFile(path=relpath, size_bytes=len(data), written=False)
        if path.exists():
            logger.info("instance %s re-sent with different bytes: replacing %s", sop_uid, relpath)
        atomic_write_bytes(path, data)
        return StoredFile(path=relpath, size_bytes=len(data), written=True)


def _has_content(path: Path, data: bytes) -> bool:
    """True if ``path`` is a file holding exactly ``data``."""
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("cannot read existing %s (%s): it will be rewritten", path, exc)
        return False


def _make_dirs_durable(folder: Path) -> None:
    """Create ``folder`` and missing parents, fsyncing each parent that gained an entry."""
    missing: list[Path] = []
    current = folder
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for new_dir in reversed(missing):
        try:
            new_dir.mkdir()
        except FileExistsError:
            if not new_dir.is_dir():
                raise
            continue
        _fsync_dir(new_dir.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries durable (no-op where folders cannot be opened, e.g. Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    """Remove a temporary file after a failed write, logging if even that fails."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("cannot remove temporary file %s: %s", path, exc)
