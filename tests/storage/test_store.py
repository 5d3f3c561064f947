"""Tests of storage.store: a C-STORE's bytes written atomically, then indexed."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, NuclearMedicineImageStorage

from storage import InvalidUIDError, Storage, StorageFullError


def _encoded(sop_uid: str = "1.2.826.0.1.3", description: str = "RECON") -> tuple[bytes, Dataset]:
    ds = Dataset()
    ds.SOPClassUID = NuclearMedicineImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = "1.2.826.0.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.2"
    ds.PatientID = "P1"
    ds.PatientName = "Doe^John"
    ds.Modality = "NM"
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), ds


def _files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "dicom").rglob("*") if p.is_file())


def test_store_instance_writes_file_then_row(tmp_path: Path) -> None:
    data, ds = _encoded()
    with Storage.open(tmp_path / "store") as storage:
        record, is_new = storage.store_instance(data, ds, calling_ae_title="PACS", received_at=5.0)
        assert is_new
        path = storage.layout.resolve(record.path)
        assert path.read_bytes() == data
        assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
        assert record.size_bytes == len(data) and record.transfer_syntax_uid == ExplicitVRLittleEndian
        assert storage.index.instance(ds.SOPInstanceUID) == record
        assert storage.layout.index_path.is_file()


def test_resent_instance_is_idempotent(tmp_path: Path) -> None:
    data, ds = _encoded()
    with Storage.open(tmp_path) as storage:
        first, _ = storage.store_instance(data, ds, calling_ae_title="PACS")
        second, is_new = storage.store_instance(data, ds, calling_ae_title="PACS")
        assert not is_new and second.path == first.path
        assert len(_files(tmp_path)) == 1
        assert len(storage.index.instances_for_series(ds.SeriesInstanceUID)) == 1
        changed, changed_ds = _encoded(description="RECON v2")
        third, is_new = storage.store_instance(changed, changed_ds, calling_ae_title="PACS")
        assert not is_new and storage.layout.resolve(third.path).read_bytes() == changed
        assert storage.index.instance(ds.SOPInstanceUID) == third
        assert third.series_description == "RECON v2"


def test_failed_write_leaves_no_file_and_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ds = _encoded()
    with Storage.open(tmp_path) as storage:

        def disk_full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "replace", disk_full)
        with pytest.raises(StorageFullError):
            storage.store_instance(data, ds, calling_ae_title="PACS")
        monkeypatch.undo()
        assert _files(tmp_path) == []
        assert storage.index.instance(ds.SOPInstanceUID) is None
        assert storage.index.series(ds.SeriesInstanceUID) is None
        # the sender retries once space is back: it works
        _, is_new = storage.store_instance(data, ds, calling_ae_title="PACS")
        assert is_new


def test_low_free_space_is_refused_before_writing(tmp_path: Path) -> None:
    data, ds = _encoded()
    with Storage.open(tmp_path, min_free_bytes=1 << 62) as storage:
        with pytest.raises(StorageFullError, match="free"):
            storage.store_instance(data, ds, calling_ae_title="PACS")
        assert _files(tmp_path) == [] and storage.index.instance(ds.SOPInstanceUID) is None


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_unsafe_uid_is_refused(tmp_path: Path) -> None:
    data, ds = _encoded(sop_uid="../../escape")
    with Storage.open(tmp_path) as storage, pytest.raises(InvalidUIDError):
        storage.store_instance(data, ds, calling_ae_title="PACS")
    assert not (tmp_path.parent / "escape.dcm").exists()
