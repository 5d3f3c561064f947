"""The Query/Retrieve information model as the index sees it: levels, keys, queries and match rows.

Each attribute the index can match is listed once in :data:`ATTRIBUTES` with its
column of the ``instances`` table, its level and how its values match (see
:mod:`storage.query`). A query returns one frozen row per entity of its level:
:class:`PatientMatch`, :class:`StudyMatch`, :class:`SeriesMatch` or
:class:`InstanceMatch`, which also carry the attributes of the levels above and
the computed counts; :meth:`value` reads any of them by DICOM keyword.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import ClassVar


class QueryError(ValueError):
    """The query does not fit the information model, or a matching value cannot be used."""


class QueryLevel(enum.StrEnum):
    """Query/Retrieve Level (0008,0052)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        """0 for PATIENT down to 3 for IMAGE."""
        return _LEVEL_ORDER.index(self)


_LEVEL_ORDER: tuple[QueryLevel, ...] = (QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE)


class InformationModel(enum.StrEnum):
    """The Query/Retrieve information models the node supports."""

    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"

    @property
    def levels(self) -> tuple[QueryLevel, ...]:
        """The levels of the model, top first."""
        return _LEVEL_ORDER if self is InformationModel.PATIENT_ROOT else _LEVEL_ORDER[1:]


class ValueKind(enum.Enum):
    """How the values of an attribute match (PS3.4 C.2.2.2)."""

    TEXT = "text"  # case-sensitive, wildcards allowed
    PERSON_NAME = "person name"  # case-insensitive, wildcards allowed
    UID = "uid"  # single value or list, no wildcards
    DATE = "date"
    TIME = "time"
    INTEGER = "integer"


@dataclass(frozen=True, slots=True)
class Attribute:
    """An attribute the index can match: DICOM keyword, ``instances`` column, level, kind of values."""

    keyword: str
    column: str
    level: QueryLevel
    kind: ValueKind


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("PatientID", "patient_id", QueryLevel.PATIENT, ValueKind.TEXT),
    Attribute("PatientName", "patient_name", QueryLevel.PATIENT, ValueKind.PERSON_NAME),
    Attribute("PatientBirthDate", "patient_birth_date", QueryLevel.PATIENT, ValueKind.DATE),
    Attribute("PatientSex", "patient_sex", QueryLevel.PATIENT, ValueKind.TEXT),
    Attribute("StudyInstanceUID", "study_instance_uid", QueryLevel.STUDY, ValueKind.UID),
    Attribute("StudyDate", "study_date", QueryLevel.STUDY, ValueKind.DATE),
    Attribute("StudyTime", "study_time", QueryLevel.STUDY, ValueKind.TIME),
    Attribute("AccessionNumber", "accession_number", QueryLevel.STUDY, ValueKind.TEXT),
    Attribute("StudyID", "study_id", QueryLevel.STUDY, ValueKind.TEXT),
    Attribute("StudyDescription", "study_description", QueryLevel.STUDY, ValueKind.TEXT),
    Attribute("ReferringPhysicianName", "referring_physician_name", QueryLevel.STUDY, ValueKind.PERSON_NAME),
    Attribute("SeriesInstanceUID", "series_instance_uid", QueryLevel.SERIES, ValueKind.UID),
    Attribute("Modality", "modality", QueryLevel.SERIES, ValueKind.TEXT),
    Attribute("SeriesNumber", "series_number", QueryLevel.SERIES, ValueKind.INTEGER),
    Attribute("SeriesDescription", "series_description", QueryLevel.SERIES, ValueKind.TEXT),
    Attribute("SeriesDate", "series_date", QueryLevel.SERIES, ValueKind.DATE),
    Attribute("SOPInstanceUID", "sop_instance_uid", QueryLevel.IMAGE, ValueKind.UID),
    Attribute("SOPClassUID", "sop_class_uid", QueryLevel.IMAGE, ValueKind.UID),
    Attribute("InstanceNumber", "instance_number", QueryLevel.IMAGE, ValueKind.INTEGER),
    Attribute("NumberOfFrames", "number_of_frames", QueryLevel.IMAGE, ValueKind.INTEGER),
)
BY_KEYWORD: Mapping[str, Attribute] = MappingProxyType({a.keyword: a for a in ATTRIBUTES})

#: The unique key of each level (PS3.4 C.6.1.1, C.6.2.1).
UNIQUE_KEYS: Mapping[QueryLevel, str] = MappingProxyType(
    {
        QueryLevel.PATIENT: "PatientID",
        QueryLevel.STUDY: "StudyInstanceUID",
        QueryLevel.SERIES: "SeriesInstanceUID",
        QueryLevel.IMAGE: "SOPInstanceUID",
    }
)
MODALITIES_IN_STUDY = "ModalitiesInStudy"
#: Required Keys that are not unique keys (PS3.4 C.6.1.1, C.6.2.1): an entity without a value for one
#: matches any value of it (C.2.2.1.2). PatientID, a unique key in the Patient Root, is not among them.
REQUIRED_KEYS: frozenset[str] = frozenset(
    {
        "PatientName",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "Modality",
        "SeriesNumber",
        "InstanceNumber",
    }
)

# Computed (aggregate) attributes: DICOM keyword -> field name of the match rows.
COMPUTED: Mapping[str, str] = MappingProxyType(
    {
        "NumberOfPatientRelatedStudies": "number_of_patient_related_studies",
        "NumberOfPatientRelatedSeries": "number_of_patient_related_series",
        "NumberOfPatientRelatedInstances": "number_of_patient_related_instances",
        "NumberOfStudyRelatedSeries": "number_of_study_related_series",
        "NumberOfStudyRelatedInstances": "number_of_study_related_instances",
        MODALITIES_IN_STUDY: "modalities_in_study",
        "NumberOfSeriesRelatedInstances": "number_of_series_related_instances",
    }
)


@dataclass(frozen=True, slots=True)
class Query:
    """One C-FIND, C-MOVE or C-GET identifier, in index terms.

    Attributes
    ----------
    model : InformationModel
        Patient Root or Study Root.
    level : QueryLevel
        Query/Retrieve Level; must be one of the model's levels.
    keys : Mapping[str, str]
        DICOM keyword -> matching value as DICOM encodes it (multi-values
        joined by a backslash; ``""`` for universal matching).
    """

    model: InformationModel
    level: QueryLevel
    keys: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in self.model.levels:
            raise QueryError(f"level {self.level} is not part of the {self.model} information model")


# ----------------------------------------------------------------------------- match rows


@dataclass(frozen=True, slots=True, kw_only=True)
class _PatientAttributes:
    patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None

    _keywords: ClassVar[Mapping[str, str]] = MappingProxyType(
        {a.keyword: a.column for a in ATTRIBUTES} | dict(COMPUTED)
    )

    def value(self, keyword: str) -> str | int | tuple[str, ...] | None:
        """The value of a DICOM attribute (by keyword) held by this row, or None.

        None also answers keywords of other levels and keywords the index does not hold.
        """
        name = self._keywords.get(keyword)
        return getattr(self, name, None) if name is not None else None


@dataclass(frozen=True, slots=True, kw_only=True)
class _StudyAttributes(_PatientAttributes):
    study_instance_uid: str
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    study_id: str | None
    study_description: str | None
    referring_physician_name: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _SeriesAttributes(_StudyAttributes):
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    series_date: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientMatch(_PatientAttributes):
    """A patient that matched, with its counts."""

    number_of_patient_related_studies: int
    number_of_patient_related_series: int
    number_of_patient_related_instances: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyMatch(_StudyAttributes):
    """A study that matched, with its patient's attributes and its counts.

    ``modalities_in_study`` is sorted and holds each modality once.
    """

    number_of_study_related_series: int
    number_of_study_related_instances: int
    modalities_in_study: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesMatch(_SeriesAttributes):
    """A series that matched, with its study's and patient's attributes."""

    number_of_series_related_instances: int


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceMatch(_SeriesAttributes):
    """An instance that matched, with its series', study's and patient's attributes."""

    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    number_of_frames: int | None


Match = PatientMatch | StudyMatch | SeriesMatch | InstanceMatch

MATCH_TYPES: Mapping[QueryLevel, type[Match]] = MappingProxyType(
    {
        QueryLevel.PATIENT: PatientMatch,
        QueryLevel.STUDY: StudyMatch,
        QueryLevel.SERIES: SeriesMatch,
        QueryLevel.IMAGE: InstanceMatch,
    }
)


def supported_keys(level: QueryLevel) -> frozenset[str]:
    """DICOM keywords the index can match and return at ``level`` (including computed ones)."""
    keys = {a.keyword for a in ATTRIBUTES if a.level.depth <= level.depth}
    keys |= {k for k, name in COMPUTED.items() if name in {f.name for f in fields(MATCH_TYPES[level])}}
    return frozenset(keys)
