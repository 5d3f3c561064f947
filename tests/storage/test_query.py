"""Query/Retrieve matching (PS3.4 C.2.2.2) against a real SQLite index filled with instance records."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest

from storage import (
    Index,
    InformationModel,
    InstanceMatch,
    InstanceRecord,
    PatientMatch,
    Query,
    QueryError,
    QueryLevel,
    SeriesMatch,
    StudyMatch,
)
from storage.query import supported_keys

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT = InformationModel.STUDY_ROOT
PATIENT_ROOT = InformationModel.PATIENT_ROOT


@pytest.fixture
def filled(index: Index, make_record: Callable[..., InstanceRecord]) -> Index:
    """Four patients, five studies, seven series, nine instances."""
    jane = dict(patient_id="P1", patient_name="Doe^Jane", patient_birth_date="19600101", patient_sex="F")
    study1 = dict(
        jane,
        study_date="20240115",
        study_time="093000",
        accession_number="A1",
        study_description="SPECT MPI rest",
        referring_physician_name="House^Gregory",
    )
    study2 = dict(
        jane, study_date="20240301", study_time="141500", accession_number="A2", study_description="Rest [low dose]"
    )
    john = dict(patient_id="P2", patient_name="Roe^John", patient_birth_date="19700505", patient_sex="M")
    study3 = dict(
        john, study_date="20231231", study_time="235959", accession_number="A3", study_description="Bone scan"
    )
    noon = dict(study_time="120000", accession_number="A4", modality="NM", series_number=1, instance_number=1)
    records = [
        make_record("1.1.1.1", "1.1.1", "1.1", modality="NM", series_number=1, instance_number=1, **study1),
        make_record("1.1.1.2", "1.1.1", "1.1", modality="NM", series_number=1, instance_number=2, **study1),
        make_record("1.1.2.1", "1.1.2", "1.1", modality="SEG", series_number=900, sop_class_uid=SEG_STORAGE, **study1),
        make_record("1.2.1.1", "1.2.1", "1.2", modality="NM", series_number=1, **study2),
        make_record("1.3.1.1", "1.3.1", "1.3", modality="CT", sop_class_uid=CT_STORAGE, **study3),
        make_record("1.3.2.1", "1.3.2", "1.3", modality="NM", series_number=2, **study3),
        make_record("1.4.1.1", "1.4.1", "1.4", patient_id="P_3", patient_name="A_B", study_date="20240102", **noon),
        make_record("1.5.1.1", "1.5.1", "1.5", patient_id="PX3", patient_name="AXB", study_date="20240103", **noon),
        make_record("1.5.1.2", "1.5.1", "1.5", patient_id="PX3", patient_name="AXB", study_date="20240103", **noon),
    ]
    for record in records:
        index.add_instance(record)
    return index


def _studies(index: Index, model: InformationModel = STUDY_ROOT, **keys: str) -> list[str]:
    matches = index.find(Query(model, QueryLevel.STUDY, keys))
    assert all(isinstance(m, StudyMatch) for m in matches)
    return sorted(m.study_instance_uid for m in matches)  # type: ignore[union-attr]


def _series(index: Index, **keys: str) -> list[str]:
    matches = index.find(Query(STUDY_ROOT, QueryLevel.SERIES, keys))
    assert all(isinstance(m, SeriesMatch) for m in matches)
    return sorted(m.series_instance_uid for m in matches)  # type: ignore[union-attr]


def _patients(index: Index, **keys: str) -> list[str | None]:
    matches = index.find(Query(PATIENT_ROOT, QueryLevel.PATIENT, keys))
    assert all(isinstance(m, PatientMatch) for m in matches)
    return sorted(m.patient_id for m in matches)  # type: ignore[type-var]


def test_universal_matching_returns_everything(filled: Index) -> None:
    assert _studies(filled, StudyInstanceUID="", PatientName="", StudyDate="") == ["1.1", "1.2", "1.3", "1.4", "1.5"]
    assert _studies(filled, PatientName="*") == ["1.1", "1.2", "1.3", "1.4", "1.5"]
    assert _patients(filled) == ["P1", "P2", "PX3", "P_3"]


def test_single_value_matching(filled: Index) -> None:
    assert _studies(filled, PatientID="P1") == ["1.1", "1.2"]
    assert _studies(filled, AccessionNumber="A1") == ["1.1"]
    assert _series(filled, Modality="nm") == []  # CS is case-sensitive
    assert _studies(filled, PatientName="doe^jane") == ["1.1", "1.2"]  # PN is not
    assert _studies(filled, ReferringPhysicianName="HOUSE^GREGORY") == ["1.1"]
    assert _studies(filled, PatientID="P1", StudyDate="20240301") == ["1.2"]  # keys combine with AND


def test_an_unknown_required_key_matches_every_value(filled: Index, make_record: Callable[..., InstanceRecord]) -> None:
    """PS3.4 C.2.2.1.2: a Required Key the entity holds no value for is a successful match."""
    filled.add_instance(
        make_record("1.6.1.1", "1.6.1", "1.6", patient_id="P6", patient_name="", study_date="20240105", modality=None)
    )
    assert _studies(filled, AccessionNumber="A1") == ["1.1", "1.6"]
    assert _studies(filled, StudyTime="0930-1000") == ["1.1", "1.6"]
    assert _studies(filled, PatientName="Doe*") == ["1.1", "1.2", "1.6"]
    assert _series(filled, Modality="CT") == ["1.3.1", "1.6.1"]
    assert _studies(filled, StudyDate="20240115") == ["1.1"]  # it has a Study Date: ordinary matching
    assert _studies(filled, StudyDescription="SPECT*") == ["1.1"]  # an optional key: no value, no match
    assert _studies(filled, PatientID="P1") == ["1.1", "1.2"]  # the Patient Root's unique key: no value, no match
    # trailing empty components are no part of a name (P6 has no name: it matches any)
    assert _patients(filled, PatientName="Roe^John^^") == _patients(filled, PatientName="roe^john") == ["P2", "P6"]


def test_wildcards_star_and_question_mark(filled: Index) -> None:
    assert _studies(filled, PatientName="*john") == ["1.3"]
    assert _studies(filled, StudyDescription="SPECT*") == ["1.1"]
    assert _studies(filled, StudyDescription="?PECT MPI rest") == ["1.1"]
    assert _studies(filled, StudyDescription="?PECT") == []  # ? is exactly one character
    assert _patients(filled, PatientID="P?") == ["P1", "P2"]
    assert _patients(filled, PatientID="P*3") == ["PX3", "P_3"]


def test_special_characters_of_sql_patterns_are_literal(filled: Index) -> None:
    assert _studies(filled, StudyDescription="Rest [low*") == ["1.2"]  # GLOB's [ escaped
    assert _patients(filled, PatientName="A_B") == ["P_3"]  # LIKE's _ escaped
    assert _patients(filled, PatientName="A?B") == ["PX3", "P_3"]
    assert _patients(filled, PatientID="P_3") == ["P_3"]


def test_uid_list_matching(filled: Index) -> None:
    assert _series(filled, SeriesInstanceUID="1.1.1") == ["1.1.1"]
    assert _series(filled, SeriesInstanceUID="1.1.1\\1.3.1\\9.9.9") == ["1.1.1", "1.3.1"]
    assert _studies(filled, StudyInstanceUID="1.2\\1.3") == ["1.2", "1.3"]
    with pytest.raises(QueryError, match="wildcards"):
        _series(filled, SeriesInstanceUID="1.1.*")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240101-", ["1.1", "1.2", "1.4", "1.5"]),
        ("-20231231", ["1.3"]),
        ("20240101-20240115", ["1.1", "1.4", "1.5"]),  # bounds are inclusive
        ("20240301", ["1.2"]),
        ("-", ["1.1", "1.2", "1.3", "1.4", "1.5"]),
    ],
)
def test_date_range_matching(filled: Index, value: str, expected: list[str]) -> None:
    assert _studies(filled, StudyDate=value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0930", ["1.1"]),  # a partial time covers its minute
        ("09-10", ["1.1"]),
        ("1415-", ["1.2", "1.3"]),
        ("-093000", ["1.1"]),
        ("-092959.999", []),
        ("235959.000000", ["1.3"]),
    ],
)
def test_time_range_matching(filled: Index, value: str, expected: list[str]) -> None:
    assert _studies(filled, StudyTime=value) == expected


@pytest.mark.parametrize(
    "keys", [{"StudyDate": "2024-01-01"}, {"StudyDate": "20240201-20240101"}, {"StudyTime": "9:30"}]
)
def test_malformed_ranges_are_refused(filled: Index, keys: dict[str, str]) -> None:
    with pytest.raises(QueryError):
        filled.find(Query(STUDY_ROOT, QueryLevel.STUDY, keys))


def test_modality_at_series_level_with_count(filled: Index) -> None:
    (match,) = filled.find(Query(STUDY_ROOT, QueryLevel.SERIES, {"Modality": "SEG", "SeriesInstanceUID": ""}))
    assert isinstance(match, SeriesMatch)
    assert (match.series_instance_uid, match.study_instance_uid, match.modality) == ("1.1.2", "1.1", "SEG")
    assert match.number_of_series_related_instances == 1
    assert match.series_number == 900
    nm = filled.find(Query(STUDY_ROOT, QueryLevel.SERIES, {"Modality": "NM", "StudyInstanceUID": "1.1"}))
    assert [m.value("NumberOfSeriesRelatedInstances") for m in nm] == [2]


def test_modalities_in_study_matches_any_series_and_counts_all(filled: Index) -> None:
    (match,) = filled.find(Query(STUDY_ROOT, QueryLevel.STUDY, {"ModalitiesInStudy": "SEG"}))
    assert isinstance(match, StudyMatch)
    assert match.study_instance_uid == "1.1"
    assert match.modalities_in_study == ("NM", "SEG")  # every series, not only the matching one
    assert match.number_of_study_related_series == 2
    assert match.number_of_study_related_instances == 3
    assert match.value("ModalitiesInStudy") == ("NM", "SEG")
    assert _studies(filled, ModalitiesInStudy="CT\\SEG") == ["1.1", "1.3"]
    assert _studies(filled, ModalitiesInStudy="S*") == ["1.1"]
    assert _studies(filled, ModalitiesInStudy="MR") == []


def test_patient_level_counts(filled: Index) -> None:
    matches = {m.patient_id: m for m in filled.find(Query(PATIENT_ROOT, QueryLevel.PATIENT, {"PatientID": "P1"}))}
    jane = matches["P1"]
    assert isinstance(jane, PatientMatch) and list(matches) == ["P1"]
    assert (jane.patient_name, jane.patient_birth_date, jane.patient_sex) == ("Doe^Jane", "19600101", "F")
    assert jane.number_of_patient_related_studies == 2
    assert jane.number_of_patient_related_series == 3
    assert jane.number_of_patient_related_instances == 4


def test_both_information_models(filled: Index) -> None:
    patient_root = _studies(filled, PATIENT_ROOT, PatientID="P2", StudyInstanceUID="")
    assert patient_root == _studies(filled, STUDY_ROOT, PatientID="P2") == ["1.3"]
    with pytest.raises(QueryError, match="PATIENT"):
        Query(STUDY_ROOT, QueryLevel.PATIENT, {})
    assert QueryLevel.PATIENT not in STUDY_ROOT.levels and QueryLevel.PATIENT in PATIENT_ROOT.levels


def test_image_level(filled: Index) -> None:
    matches = filled.find(Query(PATIENT_ROOT, QueryLevel.IMAGE, {"PatientID": "P1", "SeriesInstanceUID": "1.1.1"}))
    assert all(isinstance(m, InstanceMatch) for m in matches)
    assert [m.value("SOPInstanceUID") for m in matches] == ["1.1.1.1", "1.1.1.2"]  # by Instance Number
    assert [m.value("InstanceNumber") for m in matches] == [1, 2]
    (seg,) = filled.find(Query(STUDY_ROOT, QueryLevel.IMAGE, {"SOPClassUID": SEG_STORAGE}))
    assert seg.value("SOPInstanceUID") == "1.1.2.1" and seg.value("Modality") == "SEG"
    assert seg.value("NumberOfStudyRelatedSeries") is None  # a study-level count is not an image attribute


def test_keys_below_the_level_and_unknown_keys_are_ignored(filled: Index) -> None:
    assert _studies(filled, Modality="SEG", PatientComments="x") == ["1.1", "1.2", "1.3", "1.4", "1.5"]
    assert "Modality" not in supported_keys(QueryLevel.STUDY)
    assert {"ModalitiesInStudy", "NumberOfStudyRelatedInstances", "PatientName"} <= supported_keys(QueryLevel.STUDY)
    assert "SOPInstanceUID" in supported_keys(QueryLevel.IMAGE)


def test_retrieve_uses_unique_keys(filled: Index) -> None:
    study = filled.retrieve(Query(STUDY_ROOT, QueryLevel.STUDY, {"StudyInstanceUID": "1.1", "Modality": "SEG"}))
    assert [r.sop_instance_uid for r in study] == ["1.1.1.1", "1.1.1.2", "1.1.2.1"]
    assert all(isinstance(r, InstanceRecord) and r.path.endswith(".dcm") for r in study)
    series = filled.retrieve(Query(STUDY_ROOT, QueryLevel.SERIES, {"SeriesInstanceUID": "1.1.2\\1.3.1"}))
    assert [r.sop_instance_uid for r in series] == ["1.1.2.1", "1.3.1.1"]
    patient = filled.retrieve(Query(PATIENT_ROOT, QueryLevel.PATIENT, {"PatientID": "P2"}))
    assert sorted(r.sop_instance_uid for r in patient) == ["1.3.1.1", "1.3.2.1"]
    image = filled.retrieve(Query(PATIENT_ROOT, QueryLevel.IMAGE, {"PatientID": "P1", "SOPInstanceUID": "1.1.1.2"}))
    assert [r.sop_instance_uid for r in image] == ["1.1.1.2"]
    wrong_study = {"StudyInstanceUID": "1.3", "SeriesInstanceUID": "1.1.2"}
    assert filled.retrieve(Query(STUDY_ROOT, QueryLevel.SERIES, wrong_study)) == []


@pytest.mark.parametrize(
    "keys", [{}, {"StudyInstanceUID": ""}, {"StudyInstanceUID": "*"}, {"StudyInstanceUID": "\\"}, {"PatientID": "P1"}]
)
def test_retrieve_without_the_unique_key_is_refused(filled: Index, keys: dict[str, str]) -> None:
    with pytest.raises(QueryError, match="StudyInstanceUID"):  # an empty list ("\\") would have matched everything
        filled.retrieve(Query(STUDY_ROOT, QueryLevel.STUDY, keys))


@pytest.mark.parametrize("value", ["**", "P?", "P1\\*"])
def test_a_retrieve_takes_no_wildcards(filled: Index, value: str) -> None:
    with pytest.raises(QueryError, match="PatientID: wildcards are not allowed"):
        filled.retrieve(Query(PATIENT_ROOT, QueryLevel.PATIENT, {"PatientID": value}))


def test_modality_index_is_used(filled: Index) -> None:
    with sqlite3.connect(filled.path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT DISTINCT series_instance_uid FROM instances WHERE modality IN ('SEG')"
        ).fetchall()
    assert any("instances_by_modality" in str(row) for row in plan)
