"""Tests of storage.records: building an InstanceRecord from a pydicom dataset."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian as EXPLICIT_VR_LITTLE_ENDIAN
from pydicom.uid import NuclearMedicineImageStorage as NM_IMAGE_STORAGE

from storage import InstanceRecord, Job, JobState


def _nm_dataset() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    ds.file_meta.MediaStorageSOPClassUID = NM_IMAGE_STORAGE
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2.826.0.1.3"
    ds.SeriesInstanceUID = "1.2.826.0.1.2"
    ds.StudyInstanceUID = "1.2.826.0.1.1"
    ds.PatientID = "ID42"
    ds.PatientName = "Müller^Anna"
    ds.PatientBirthDate = "19600102"
    ds.PatientSex = "F"
    ds.StudyDate = "20240131"
    ds.StudyTime = "101500"
    ds.AccessionNumber = ""
    ds.StudyID = "7"
    ds.StudyDescription = "MPI rest"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.Modality = "NM"
    ds.SeriesNumber = "3"
    ds.SeriesDescription = "RECON"
    ds.SeriesDate = "20240131"
    ds.InstanceNumber = 1
    ds.NumberOfFrames = "56"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    return ds


def test_from_dataset_reads_every_indexed_attribute() -> None:
    record = InstanceRecord.from_dataset(
        _nm_dataset(),
        path="dicom/a/b/c.dcm",
        size_bytes=12,
        received_at=5.0,
        calling_ae_title="PACS",
    )
    assert record.sop_instance_uid == "1.2.826.0.1.3"
    assert record.series_instance_uid == "1.2.826.0.1.2"
    assert record.study_instance_uid == "1.2.826.0.1.1"
    assert record.sop_class_uid == NM_IMAGE_STORAGE
    assert record.transfer_syntax_uid == EXPLICIT_VR_LITTLE_ENDIAN
    assert record.patient_name == "Müller^Anna"
    assert record.referring_physician_name == "Who^Doctor"
    assert (record.patient_id, record.patient_sex, record.patient_birth_date) == ("ID42", "F", "19600102")
    assert (record.study_date, record.study_time, record.study_id) == ("20240131", "101500", "7")
    assert record.accession_number is None  # empty (type 2) becomes None
    assert (record.series_number, record.instance_number, record.number_of_frames) == (3, 1, 56)
    assert record.image_type == "ORIGINAL\\PRIMARY\\RECON TOMO\\EMISSION"
    assert record.series_description == "RECON" and record.series_date == "20240131"
    assert (record.path, record.size_bytes, record.received_at) == ("dicom/a/b/c.dcm", 12, 5.0)
    assert record.calling_ae_title == "PACS" and record.is_result is False


def test_optional_attributes_may_be_missing() -> None:
    ds = Dataset()
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2"
    ds.StudyInstanceUID = "1"
    record = InstanceRecord.from_dataset(
        ds,
        path="p",
        size_bytes=1,
        received_at=0.0,
        transfer_syntax_uid="1.2.840.10008.1.2",
        is_result=True,
    )
    assert record.is_result and record.calling_ae_title is None
    optional = [
        f.name for f in dataclasses.fields(InstanceRecord) if f.default is None and f.name != "calling_ae_title"
    ]
    assert optional and all(getattr(record, name) is None for name in optional)


def test_sop_class_falls_back_to_file_meta() -> None:
    ds = _nm_dataset()
    del ds.SOPClassUID
    record = InstanceRecord.from_dataset(ds, path="p", size_bytes=1, received_at=0.0)
    assert record.sop_class_uid == NM_IMAGE_STORAGE


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_missing_identifying_uid_is_an_error(keyword: str) -> None:
    ds = _nm_dataset()
    delattr(ds, keyword)
    with pytest.raises(ValueError, match=keyword):
        InstanceRecord.from_dataset(ds, path="p", size_bytes=1, received_at=0.0)


def test_unknown_transfer_syntax_is_an_error() -> None:
    ds = _nm_dataset()
    del ds.file_meta
    with pytest.raises(ValueError, match="transfer syntax"):
        InstanceRecord.from_dataset(ds, path="p", size_bytes=1, received_at=0.0)


def test_records_are_frozen() -> None:
    record = InstanceRecord.from_dataset(_nm_dataset(), path="p", size_bytes=1, received_at=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.path = "other"  # type: ignore[misc]


def test_job_from_row_converts_state_and_timings() -> None:
    row = dict(
        id=1,
        series_instance_uid="1.2",
        kind="segment",
        state="done",
        reason=None,
        attempts=1,
        created_at=0.0,
        started_at=1.0,
        finished_at=2.0,
        claimed_by="w",
        not_before=None,
        convert_s=0.5,
        infer_s=None,
        encode_s=0.1,
    )
    job = Job.from_row(row)
    assert job.state is JobState.DONE and not job.state.is_active
    assert job.timings.convert_s == 0.5 and job.timings.infer_s is None
