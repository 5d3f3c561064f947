"""Tests of storage.layout: paths, UID safety, atomic and idempotent writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from storage import InvalidUIDError, StorageError, StorageFullError, StorageLayout, free_bytes
from storage.layout import atomic_write_bytes, check_uid


def _all_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def test_instance_path_follows_study_series_sop(tmp_path: Path) -> None:
    layout = StorageLayout(tmp_path)
    relpath = layout.instance_relpath("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert relpath == "dicom/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert layout.resolve(relpath) == tmp_path / "dicom" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert layout.relative(layout.resolve(relpath)) == relpath
    assert layout.nifti_path("1.2.9") == tmp_path / "nifti" / "1.2.9.nii.gz"
    assert layout.series_results_dir("1.2.9") == tmp_path / "results" / "1.2.9"
    assert layout.index_path == tmp_path / "index.sqlite3"


@pytest.mark.parametrize("uid", ["", ".", "..", "../1.2", "1.2/3", "1.2\\3", "1" * 65, "1.2 3"])
def test_unsafe_uids_are_refused(tmp_path: Path, uid: str) -> None:
    with pytest.raises(InvalidUIDError):
        check_uid(uid)
    with pytest.raises(ValueError):  # InvalidUIDError is also a ValueError
        StorageLayout(tmp_path).write_instance_bytes("1.2", "1.2.3", uid, b"x")
    assert _all_files(tmp_path) == []


@pytest.mark.parametrize("relpath", ["../outside", "/etc/passwd", "dicom/../../x", ""])
def test_resolve_refuses_paths_outside_root(tmp_path: Path, relpath: str) -> None:
    with pytest.raises(StorageError):
        StorageLayout(tmp_path).resolve(relpath)


def test_create_makes_top_level_folders(tmp_path: Path) -> None:
    layout = StorageLayout(tmp_path / "new" / "root")
    layout.create()
    assert layout.dicom_dir.is_dir() and layout.nifti_dir.is_dir() and layout.results_dir.is_dir()


def test_write_instance_bytes_writes_exactly_and_leaves_no_temporary(tmp_path: Path) -> None:
    layout = StorageLayout(tmp_path)
    data = os.urandom(3 * (1 << 20) + 17)  # more than one write chunk
    stored = layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", data)
    assert stored.written and stored.size_bytes == len(data)
    assert layout.resolve(stored.path).read_bytes() == data
    assert _all_files(tmp_path) == [layout.resolve(stored.path)]


def test_resend_with_identical_bytes_keeps_the_file(tmp_path: Path) -> None:
    layout = StorageLayout(tmp_path)
    first = layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", b"DICM-data")
    path = layout.resolve(first.path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    again = layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", b"DICM-data")
    assert again.path == first.path and not again.written
    assert path.stat().st_mtime_ns == 1_000_000_000


def test_resend_with_different_bytes_replaces_the_file(tmp_path: Path) -> None:
    layout = StorageLayout(tmp_path)
    layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", b"old-bytes")
    again = layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", b"new")
    assert again.written
    assert layout.resolve(again.path).read_bytes() == b"new"
    assert len(_all_files(tmp_path)) == 1


def _raise_oserror(code: int):  # noqa: ANN202 - a monkeypatch stand-in
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


def test_disk_full_at_rename_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = StorageLayout(tmp_path)
    monkeypatch.setattr(os, "replace", _raise_oserror(errno.ENOSPC))
    with pytest.raises(StorageFullError) as caught:
        layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", b"payload")
    assert isinstance(caught.value.__cause__, OSError)
    assert _all_files(tmp_path) == []


def test_disk_full_while_writing_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = []

    def write_then_fail(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_then_fail)
    with pytest.raises(StorageFullError):
        atomic_write_bytes(tmp_path / "big.bin", b"x" * (3 << 20))
    assert len(calls) == 2  # one chunk written, the second failed
    assert _all_files(tmp_path) == []


def test_other_io_errors_raise_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = StorageLayout(tmp_path)
    folder = layout.resolve(layout.instance_relpath("1.2", "1.2.3", "1.2.3.4")).parent
    folder.mkdir(parents=True)  # so that the first fsync is the temporary file's
    monkeypatch.setattr(os, "fsync", _raise_oserror(errno.EIO))
    with pytest.raises(StorageError) as caught:
        layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", b"payload")
    assert not isinstance(caught.value, StorageFullError)
    assert _all_files(tmp_path) == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = StorageLayout(tmp_path)
    stored = layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", b"first")
    monkeypatch.setattr(os, "replace", _raise_oserror(errno.ENOSPC))
    with pytest.raises(StorageFullError):
        layout.write_instance_bytes("1.2", "1.2.3", "1.2.3.4", b"second version")
    assert layout.resolve(stored.path).read_bytes() == b"first"
    assert len(_all_files(tmp_path)) == 1


def test_free_bytes_reports_the_file_system(tmp_path: Path) -> None:
    available = free_bytes(tmp_path)
    assert isinstance(available, int)
    assert 0 < available <= os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
