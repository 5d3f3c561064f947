"""Query/Retrieve matching against the index (PS3.4 C.2.2.2, C.4.1, C.6.1, C.6.2).

Queries run in SQL against the ``instances`` table, whose rows repeat the
patient, study and series attributes of each instance; no file is opened.
A :class:`Query` names an information model, a level and matching keys
(DICOM keyword -> value as DICOM encodes it, multi-values joined by a
backslash). Supported matching, per value representation:

- universal matching: an empty value (or ``*``) matches everything;
- single value: exact and case-sensitive (``CS``, ``LO``, ``SH``...),
  case-insensitive for person names (``PN``, ASCII letters only, trailing empty
  name components ignored: ``Roe^John`` matches ``Roe^John^^``);
- wildcards ``*`` and ``?`` (not for UIDs, dates, times and numbers);
- lists: backslash-separated values match any of them (UIDs, and also text,
  person names and numbers, ``ModalitiesInStudy`` included);
- a Required Key (PS3.4 C.6.1.1, C.6.2.1) the entity holds no value for
  matches any value (C.2.2.1.2): a study without a Study Time is found by
  every Study Time range;
- date and time ranges ``A-B``, ``A-`` and ``-B`` (inclusive; a partial
  time such as ``10`` or ``1030`` covers its whole hour or minute).

Matching is relational: any attribute at or above the query level may be a
key, and the unique keys of the levels above are optional. Keys of lower
levels or unknown to the index are ignored (universal matching), as PS3.4
allows for optional keys. Instances without a Patient ID are not found at
PATIENT level.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from storage.database import Database
from storage.qr_model import (
    ATTRIBUTES,
    BY_KEYWORD,
    MATCH_TYPES,
    MODALITIES_IN_STUDY,
    REQUIRED_KEYS,
    UNIQUE_KEYS,
    Attribute,
    InformationModel,
    InstanceMatch,
    Match,
    PatientMatch,
    Query,
    QueryError,
    QueryLevel,
    SeriesMatch,
    StudyMatch,
    ValueKind,
    supported_keys,
)
from storage.records import InstanceRecord

__all__ = [
    "UNIQUE_KEYS",
    "InformationModel",
    "InstanceMatch",
    "Match",
    "PatientMatch",
    "Query",
    "QueryError",
    "QueryLevel",
    "QueryMixin",
    "SeriesMatch",
    "StudyMatch",
    "supported_keys",
]

logger = logging.getLogger(__name__)

_DATE_RANGE = re.compile(r"^(?P<low>\d{8})?(?P<dash>-)?(?P<high>\d{8})?$")
_TIME_VALUE = r"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?"
_TIME_RANGE = re.compile(rf"^(?P<low>{_TIME_VALUE})?(?P<dash>-)?(?P<high>{_TIME_VALUE})?$")

# ----------------------------------------------------------------------------- SQL building

_ORDER_BY: Mapping[QueryLevel, str] = MappingProxyType(
    {
        QueryLevel.PATIENT: "patient_id",
        QueryLevel.STUDY: "study_date, study_time, study_instance_uid",
        QueryLevel.SERIES: "study_instance_uid, series_number IS NULL, series_number, series_instance_uid",
        QueryLevel.IMAGE: "series_instance_uid, instance_number IS NULL, instance_number, sop_instance_uid",
    }
)


@dataclass
class _Where:
    """A conjunction of SQL conditions and their parameters."""

    clauses: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, clause: str, params: Sequence[Any]) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    @property
    def sql(self) -> str:
        return " AND ".join(f"({c})" for c in self.clauses) if self.clauses else "1"


def _glob_pattern(value: str) -> str:
    """DICOM wildcards -> SQLite GLOB (case-sensitive); ``[`` is escaped as ``[[]``."""
    return value.replace("[", "[[]")


def _like_pattern(value: str) -> str:
    """DICOM wildcards -> SQLite LIKE with ``ESCAPE '\\'`` (ASCII case-insensitive)."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _any_of(column: str, values: Sequence[str], kind: ValueKind) -> tuple[str, list[Any]]:
    """``column`` matches one of ``values`` (single values or wildcard patterns)."""
    clauses: list[str] = []
    params: list[Any] = []
    exact = []
    for value in values:
        if kind is ValueKind.PERSON_NAME:  # "Roe^John" and "Roe^John^^" are one name (PS3.5 6.2.1)
            clauses.append(f"rtrim({column}, '^= ') LIKE ? ESCAPE '\\'")
            params.append(_like_pattern(value.rstrip("^= ")))
        elif "*" in value or "?" in value:
            clauses.append(f"{column} GLOB ?")
            params.append(_glob_pattern(value))
        else:
            exact.append(value)
    if exact:
        clauses.append(f"{column} IN ({', '.join('?' * len(exact))})")
        params.extend(exact)
    return " OR ".join(clauses), params


def _split(value: str) -> list[str]:
    return [part.strip(" ") for part in value.split("\\")]


def _time_bounds(value: str) -> tuple[str, str]:
    """First and last whole second (``HHMMSS``) covered by a possibly partial time."""
    hhmmss = value.split(".")[0]
    return (hhmmss + "0000")[:6], (hhmmss + "5959")[:6]


def _range(column: str, keyword: str, value: str, kind: ValueKind) -> tuple[str, list[Any]] | None:
    """Single value or range matching of a date or time; None for universal matching."""
    pattern = _DATE_RANGE if kind is ValueKind.DATE else _TIME_RANGE
    match = pattern.match(value)
    if match is None:
        raise QueryError(f"{keyword}: not a {kind.value} or a {kind.value} range")  # no value: logs hold no PHI
    low: str | None = match["low"]
    high: str | None = match["high"]
    dash = match["dash"] is not None
    if kind is ValueKind.TIME:
        # Whole seconds are compared, so a partial bound covers its hour or minute.
        column = f"substr({column} || '000000', 1, 6)"
        if not dash:
            high, dash = low, True
        low = _time_bounds(low)[0] if low else None
        high = _time_bounds(high)[1] if high else None
    if not dash:
        return (f"{column} = ?", [low]) if low else None
    if low and high:
        if low > high:
            raise QueryError(f"{keyword}: the range ends before it starts")
        return f"{column} BETWEEN ? AND ?", [low, high]
    if low:
        return f"{column} >= ?", [low]
    if high:
        return f"{column} <= ?", [high]
    return None  # "-": universal


def _condition(attribute: Attribute, value: str) -> tuple[str, list[Any]] | None:
    """The SQL condition matching ``attribute`` against ``value``; None for universal matching."""
    column, kind, keyword = attribute.column, attribute.kind, attribute.keyword
    if kind in (ValueKind.DATE, ValueKind.TIME):
        return _range(column, keyword, value, kind)
    values = [v for v in _split(value) if v]
    if not values:
        return None
    if kind is ValueKind.UID:
        bad = [v for v in values if "*" in v or "?" in v]
        if bad:
            raise QueryError(f"{keyword}: wildcards are not allowed in UIDs ({bad[0]!r})")
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)
    if kind is ValueKind.INTEGER:
        try:
            numbers = [int(v) for v in values]
        except ValueError as exc:
            raise QueryError(f"{keyword}: not an integer") from exc
        return f"{column} IN ({', '.join('?' * len(numbers))})", numbers
    return _any_of(column, values, kind)


def _is_universal(value: str) -> bool:
    return value.strip(" ") in ("", "*")


def _where(query: Query, keywords: Sequence[str] | None = None) -> _Where:
    """Conditions of the query's keys at or above its level (only ``keywords`` if given)."""
    where = _Where()
    for keyword, raw in query.keys.items():
        if keywords is not None and keyword not in keywords:
            continue
        value = str(raw).strip(" \x00")
        if _is_universal(value):
            continue
        if keyword == MODALITIES_IN_STUDY:
            if query.level is QueryLevel.STUDY:
                inner, params = _any_of("modality", [v for v in _split(value) if v], ValueKind.TEXT)
                where.add(f"study_instance_uid IN (SELECT study_instance_uid FROM instances WHERE {inner})", params)
            continue
        attribute = BY_KEYWORD.get(keyword)
        if attribute is None or attribute.level.depth > query.level.depth:
            logger.debug("key %s ignored at %s level", keyword, query.level)
            continue
        condition = _condition(attribute, value)
        if condition is None:
            continue
        clause, params = condition
        if keyword in REQUIRED_KEYS:  # no value held: a successful match (C.2.2.1.2)
            clause = f"{attribute.column} IS NULL OR {attribute.column} = '' OR ({clause})"
        where.add(clause, params)
    return where


def _select_sql(level: QueryLevel, where: _Where) -> str:
    """SELECT of the match rows of ``level``: attributes and aggregates over *all* instances of each entity."""
    if level is QueryLevel.IMAGE:
        columns = ", ".join(f.name for f in fields(InstanceMatch))
        return f"SELECT {columns} FROM instances WHERE {where.sql} ORDER BY {_ORDER_BY[level]}"
    key = BY_KEYWORD[UNIQUE_KEYS[level]].column
    match_fields = {f.name for f in fields(MATCH_TYPES[level])}
    attributes = [a.column for a in ATTRIBUTES if a.column in match_fields and a.column != key]
    aggregates = {
        "number_of_patient_related_studies": "COUNT(DISTINCT study_instance_uid)",
        "number_of_patient_related_series": "COUNT(DISTINCT series_instance_uid)",
        "number_of_patient_related_instances": "COUNT(*)",
        "number_of_study_related_series": "COUNT(DISTINCT series_instance_uid)",
        "number_of_study_related_instances": "COUNT(*)",
        "modalities_in_study": "GROUP_CONCAT(DISTINCT modality)",
        "number_of_series_related_instances": "COUNT(*)",
    }
    selected = [key, *(f"MAX({c}) AS {c}" for c in attributes)]
    selected += [f"{sql} AS {name}" for name, sql in aggregates.items() if name in match_fields]
    return (
        f"SELECT {', '.join(selected)} FROM instances"
        f" WHERE {key} IN (SELECT {key} FROM instances WHERE {where.sql})"
        f" GROUP BY {key} ORDER BY {_ORDER_BY[level]}"
    )


def _to_match(level: QueryLevel, row: Mapping[str, Any]) -> Match:
    values = dict(row)
    if level is QueryLevel.STUDY:
        modalities = values["modalities_in_study"]
        values["modalities_in_study"] = tuple(sorted(set(modalities.split(",")))) if modalities else ()
    return MATCH_TYPES[level](**values)


# ----------------------------------------------------------------------------- the mixin


class QueryMixin:
    """Query/Retrieve methods of :class:`storage.index.Index` (needs ``self._db``)."""

    _db: Database

    def find(self, query: Query) -> list[Match]:
        """C-FIND: the entities of ``query.level`` that match its keys.

        Parameters
        ----------
        query : Query
            Model, level and matching keys.

        Returns
        -------
        list of PatientMatch, StudyMatch, SeriesMatch or InstanceMatch
            One row per matching entity (the type follows the level), in a
            stable order: patients by ID, studies by date and time, series by
            number, instances by number. Counts and ``modalities_in_study``
            cover every instance of the entity, not only those that matched.

        Raises
        ------
        QueryError
            If a matching value cannot be used (bad date range, wildcard in a UID...).
        StorageError
            If the index cannot be read.
        """
        sql = _select_sql(query.level, where := _where(query))
        with self._db.read() as conn:
            rows = conn.execute(sql, where.params).fetchall()
        return [_to_match(query.level, row) for row in rows]

    def retrieve(self, query: Query) -> list[InstanceRecord]:
        """C-MOVE / C-GET: every stored instance under the entities named by the query's unique keys.

        Only the unique keys (PatientID, StudyInstanceUID, SeriesInstanceUID,
        SOPInstanceUID) of the query level and the levels above it are used;
        each may hold a list of values. Other keys are ignored.

        Returns
        -------
        list of InstanceRecord
            By study, series, Instance Number, SOP Instance UID.

        Raises
        ------
        QueryError
            If the unique key of the query level is missing or empty, or a value cannot be used.
        StorageError
            If the index cannot be read.
        """
        unique = UNIQUE_KEYS[query.level]
        if not [v for v in _split(str(query.keys.get(unique, ""))) if v]:  # "", " " and "\\" alike
            raise QueryError(f"a retrieve at {query.level} level needs a value for {unique}")
        levels = [lvl for lvl in query.model.levels if lvl.depth <= query.level.depth]
        for keyword in (UNIQUE_KEYS[lvl] for lvl in levels):  # PS3.4 C.4.2.2.1: single values or lists only
            value = str(query.keys.get(keyword, ""))
            if "*" in value or "?" in value:
                raise QueryError(f"{keyword}: wildcards are not allowed in a retrieve")
        where = _where(query, keywords=[UNIQUE_KEYS[lvl] for lvl in levels])
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT * FROM instances WHERE {where.sql} ORDER BY study_instance_uid, {_ORDER_BY[QueryLevel.IMAGE]}",
                where.params,
            ).fetchall()
        return [InstanceRecord.from_row(row) for row in rows]
