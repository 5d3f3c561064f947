"""Shared fixtures of the storage tests: an open index in tmp_path and a record factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage import Index, InstanceRecord

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    """A freshly migrated index in a real SQLite file."""
    opened = Index.open(tmp_path / "index.sqlite3")
    yield opened
    opened.close()


def build_record(
    sop_uid: str, series_uid: str = "1.2.3.1", study_uid: str = "1.2.3", **overrides: object
) -> InstanceRecord:
    """An instance record with plausible attributes; keyword arguments override fields."""
    values: dict[str, object] = dict(
        sop_instance_uid=sop_uid,
        sop_class_uid=NM_IMAGE_STORAGE,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
        path=f"dicom/{study_uid}/{series_uid}/{sop_uid}.dcm",
        size_bytes=1000,
        received_at=1000.0,
        calling_ae_title="PACS",
        patient_id="P1",
        patient_name="Doe^Jane",
        modality="NM",
        instance_number=1,
    )
    values.update(overrides)
    return InstanceRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_record() -> Callable[..., InstanceRecord]:
    """The :func:`build_record` factory."""
    return build_record
